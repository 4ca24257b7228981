"""Compares pipeserve's outputs with PyTorch's for one fixture case.

    /usr/bin/python3 tools/compare_outputs.py CASE_DIR OUT_DIR

CASE_DIR is written by tests/pytorch/make_fixtures.py (out_<i>.npy: PyTorch
float32; out64hi/lo_<i>.npy: float64); OUT_DIR holds pipeserve's out_<i>.npy.
Prints the max abs difference and both implementations' error against
float64; exits 1 if pipeserve is further from float64 than twice PyTorch's
own float32 error (or assert_close's allowance, whichever is larger).
"""
import glob
import os
import sys

import numpy as np

RTOL, ATOL = 1.3e-6, 1e-5  # torch.testing.assert_close, float32


def ratio(got, exact):
    """Largest |got - exact| in units of assert_close's allowance."""
    return float(np.max(np.abs(got - exact) / (ATOL + RTOL * np.abs(exact))))


def main(case_dir, out_dir):
    ok = True
    for ref_path in sorted(glob.glob(os.path.join(case_dir, "out_*.npy"))):
        i = ref_path.rsplit("_", 1)[1].split(".")[0]
        torch32 = np.load(ref_path).astype(np.float64)
        exact = (np.load(os.path.join(case_dir, f"out64hi_{i}.npy")).astype(np.float64)
                 + np.load(os.path.join(case_dir, f"out64lo_{i}.npy")))
        ours = np.load(os.path.join(out_dir, f"out_{i}.npy")).astype(np.float64)
        if ours.shape != torch32.shape:
            print(f"output {i}: shape {ours.shape} != PyTorch's {torch32.shape}")
            return 1
        ours_err, torch_err = ratio(ours, exact), ratio(torch32, exact)
        good = ours_err <= max(1.0, 2.0 * torch_err)
        ok &= good
        print(f"output {i} {list(ours.shape)}: max |pipeserve - PyTorch| = "
              f"{np.max(np.abs(ours - torch32)):.3g} (max |value| "
              f"{np.max(np.abs(exact)):.3g}); error vs float64 in assert_close "
              f"allowances: pipeserve {ours_err:.3g}, PyTorch {torch_err:.3g} "
              f"-> {'OK' if good else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
