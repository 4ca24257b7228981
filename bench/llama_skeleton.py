"""Writes the graph of a Llama-style model exported for generation, without
its weights, for bench/llama_targets (cuda_bench's targets section makes
random weights of the shapes and dtypes the graph lists, on the machine
that runs it: a TinyLlama-1.1B-shaped model is 2.2 GB of bfloat16 weights,
its graph a few hundred KB).

    /usr/bin/python3 bench/llama_skeleton.py --out DIR            # TinyLlama-1.1B
    /usr/bin/python3 bench/llama_skeleton.py --out DIR --tiny     # 2 layers, d 64

DIR/graph.pb is the model file's header (a serialized pipeserve.Graph, one
stage: no cuts); DIR/manifest.json records the shape it was built with.
TinyLlama-1.1B: 22 layers, d 2048, 32 heads, 4 KV heads, MLP 5632, vocab
32000, untied lm_head, bfloat16 (tests/pytorch/transformer_models.Llama,
as bench/tinyllama.py builds it). Needs about 7 GiB of memory and 3 GiB of
disk in $TMPDIR for a minute.
"""
import argparse
import json
import os
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path[:0] = [os.path.join(ROOT, "client/python"), os.path.join(ROOT, "tests/pytorch")]

import torch  # noqa: E402

import pipeserve  # noqa: E402
import transformer_models  # noqa: E402

SHAPES = {
    "tinyllama": dict(vocab=32000, d=2048, heads=32, kv_heads=4, hidden=5632, layers=22,
                      max_len=2048),
    "tiny": dict(vocab=97, d=64, heads=4, kv_heads=2, hidden=96, layers=2, max_len=64),
}


def graph_header(psm_path):
    """The serialized Graph at the head of a model file (runtime/model_file.h)."""
    with open(psm_path, "rb") as f:
        magic, size = f.read(8), struct.unpack("<Q", f.read(8))[0]
        if magic != b"PIPESRV1":
            raise ValueError(f"{psm_path}: not a pipeserve model file")
        return f.read(size)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same kind")
    a = p.parse_args()
    name = "tiny" if a.tiny else "tinyllama"
    shape = SHAPES[name]
    torch.manual_seed(0)
    model = transformer_models.Llama(cut=False, tie=False, **shape).eval().to(torch.bfloat16)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        psm = os.path.join(tmp, "model.psm")
        ids = torch.randint(0, shape["vocab"], (1, 7))
        pipeserve.export(model, (ids,), psm, generation=True)
        header = graph_header(psm)
    with open(os.path.join(a.out, "graph.pb"), "wb") as f:
        f.write(header)
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump({"name": name, "dtype": "bfloat16", **shape}, f, indent=2)
        f.write("\n")
    print(f"{a.out}/graph.pb: {name}, {len(header)} bytes, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
