"""Writes model files, inputs and PyTorch's outputs for pipeserve's C++ tests.

For each case (a model of models.py) it writes, under DIR/NAME/:

    model.psm          the exported model (pipeserve.export)
    in_<input>.npy     float32 inputs [batch, d], torch.randn, fixed seed
                       (the transformers of transformer_models.py, gpt2 and
                       llama, and their bfloat16 versions gpt2_bf16 and
                       llama_bf16: int64 token ids [batch, 7], fixed seed)
    out_<i>.npy        float32 outputs of the module run eagerly (no_grad)
    out64hi_<i>.npy,   the same module and inputs run in float64, the
    out64lo_<i>.npy    exact answer both float32 implementations are judged
                       by; stored as float32 hi + lo (value = hi + lo)
    manifest.json      {"name", "num_stages", "input_names", "output_names",
                        "state_dict_keys", "batch"}

Usage:

    /usr/bin/python3 tests/pytorch/make_fixtures.py --out /tmp/fx
    /usr/bin/python3 tests/pytorch/make_fixtures.py --out /tmp/fx \\
        --case multi_mlp --case cval3 --batch 37

It finds the pipeserve package relative to its own location, so it runs from a
source checkout or from Bazel runfiles (//tests/pytorch:fixtures).
"""

import argparse
import copy
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "..", "client", "python"))
sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
import pipeserve  # noqa: E402
import transformer_models  # noqa: E402

# Transformer cases (token ids in), by name; the _gen ones are exported
# for generation (model.psm and manifest.json only: their steps' inputs are
# made by the test).
TRANSFORMERS = ("gpt2", "llama", "gpt2_bf16", "llama_bf16")
GENERATION = ("gpt2_gen", "llama_gen")


def write_generation_case(name, out_dir):
    """Exports transformer `name` without _gen for generation."""
    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    model_name = name[:-len("_gen")]
    ids = torch.randint(0, transformer_models.vocab(model_name), (1, 7),
                        generator=torch.Generator().manual_seed(1234))
    info = pipeserve.export(transformer_models.make(model_name), (ids,),
                            os.path.join(case_dir, "model.psm"), generation=True)
    manifest = {"name": name, "num_stages": info.num_stages,
                "input_names": info.input_names, "output_names": info.output_names}
    with open(os.path.join(case_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def make_case(name, batch):
    """(model, {input name: tensor}) of case `name`."""
    if name in TRANSFORMERS:
        base = name.replace("_bf16", "")
        generator = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, transformer_models.vocab(base), (batch, 7), generator=generator)
        model = transformer_models.make(base)
        if name.endswith("_bf16"):  # a bfloat16 model: weights and activations
            model = model.to(torch.bfloat16)
        return model, {"ids": ids}
    return models.make(name), models.example_inputs(name, batch=batch)


def write_case(name, out_dir, batch):
    """Exports case `name` into out_dir/name and returns its manifest."""
    if name in GENERATION:
        return write_generation_case(name, out_dir)
    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    model, inputs = make_case(name, batch)
    info = pipeserve.export(model, tuple(inputs.values()),
                            os.path.join(case_dir, "model.psm"),
                            split_spec=getattr(model, "split_spec", None))
    with torch.no_grad():
        outputs = model(*inputs.values())
        # A float64 copy (deepcopy keeps aliased parameters aliased).
        exact = copy.deepcopy(model).double()(
            *[t if t.dtype == torch.int64 else t.double() for t in inputs.values()])
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
        exact = (exact,)

    # Files are named by the graph's input names (forward's argument names).
    for input_name, tensor in zip(info.input_names, inputs.values()):
        array = tensor.numpy()
        np.save(os.path.join(case_dir, f"in_{input_name}.npy"),
                array if array.dtype == np.int64 else array.astype(np.float32))
    for i, tensor in enumerate(outputs):
        np.save(os.path.join(case_dir, f"out_{i}.npy"),
                tensor.float().numpy())  # a bfloat16 output widened
    for i, tensor in enumerate(exact):
        # Stored as float32 pairs would lose the point: keep float64 values
        # as two float32 files (hi + lo) so the C++ .npy reader stays f4-only.
        hi = tensor.numpy().astype(np.float32)
        lo = (tensor.numpy() - hi.astype(np.float64)).astype(np.float32)
        np.save(os.path.join(case_dir, f"out64hi_{i}.npy"), hi)
        np.save(os.path.join(case_dir, f"out64lo_{i}.npy"), lo)
    manifest = {
        "name": name,
        "num_stages": info.num_stages,
        "input_names": info.input_names,
        "output_names": info.output_names,
        "state_dict_keys": info.param_names,
        "batch": batch,
    }
    with open(os.path.join(case_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--case", action="append", choices=models.NAMES + TRANSFORMERS + GENERATION,
                        help="a case to write (repeatable; default: all)")
    parser.add_argument("--batch", type=int, default=16,
                        help="batch size of the inputs (default 16)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    for name in args.case or models.NAMES:
        manifest = write_case(name, args.out, args.batch)
        print(f"{name}: {manifest['num_stages']} stages -> "
              f"{os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
