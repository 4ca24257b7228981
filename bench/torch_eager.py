"""Times PyTorch eager on a fixture model: the baseline for bench/compute.

    /usr/bin/python3 bench/torch_eager.py --case example_code --batch 256 \
        --threads 1 --iters 50

Builds the same module and inputs as tests/pytorch/make_fixtures.py (same
seeds), runs forward under torch.no_grad, and prints one line:
`median_ms=<float> blas_core=<OPENBLAS_CORETYPE or default>`.
"""
import argparse
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "client", "python"))
sys.path.insert(0, os.path.join(_HERE, "..", "tests", "pytorch"))


def _threads_asked():
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return "1"


# torch.set_num_threads does not reach OpenBLAS's own pool (torch.mm used
# both cores with it set to 1): the thread count a baseline claims must be
# in the environment before torch loads its BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _threads_asked()

import torch  # noqa: E402

import models  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", default="example_code")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = models.make(a.case)
    inputs = tuple(models.example_inputs(a.case, batch=a.batch).values())
    times = []
    with torch.no_grad():
        for _ in range(5):
            model(*inputs)
        for _ in range(a.iters):
            t0 = time.perf_counter()
            model(*inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    print(f"median_ms={statistics.median(times):.4f} "
          f"blas_core={os.environ.get('OPENBLAS_CORETYPE', 'default')} "
          f"threads={a.threads} openblas_threads={os.environ['OPENBLAS_NUM_THREADS']}")


if __name__ == "__main__":
    main()
