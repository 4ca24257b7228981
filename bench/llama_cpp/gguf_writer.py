"""A small pure-numpy GGUF v3 writer for a Llama-shaped model with random
weights, enough for llama.cpp (arch "llama") to load and run it.

    write_llama_gguf(path, dict(vocab=32000, d=2048, heads=32, kv_heads=4,
                                hidden=5632, layers=22), "f16")

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all
little-endian: magic "GGUF", u32 version 3, u64 tensor count, u64 metadata
count, the metadata key/values, the tensor infos (name, u32 n_dims, u64 ne[]
with ne[0] the innermost, contiguous dim, u32 ggml type, u64 offset into the
data section), padding to the alignment, then the tensor data, each tensor
starting at a multiple of the alignment.

Matrices are given here in numpy's (rows, cols) = (out, in) order, as in a
PyTorch Linear weight; GGUF's ne is that shape reversed. llama.cpp's HF
converter permutes the q/k rows for its rope layout; with random weights
that makes no difference, so nothing is permuted.
"""
import struct

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# gguf metadata value types
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9

# ggml tensor types
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 = 0, 1, 30
# llama_ftype, for general.file_type
_FILE_TYPE = {"f16": 1, "bf16": 32}  # LLAMA_FTYPE_MOSTLY_F16 / _BF16
_GGML_TYPE = {"f16": GGML_TYPE_F16, "bf16": GGML_TYPE_BF16}

# llama token types (tokenizer.ggml.token_type)
_TOK_NORMAL, _TOK_UNKNOWN, _TOK_CONTROL, _TOK_BYTE = 1, 2, 3, 6

# Token layout of the Llama 2 / TinyLlama SentencePiece vocabulary:
# <unk>, <s>, </s>, then the 256 byte tokens <0x00>..<0xFF>, then pieces.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_NORMAL_ID = 3 + 256


def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, value):
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == _STRING:
        return out + _str(value)
    if vtype == _ARRAY:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        if etype == _STRING:
            return out + b"".join(_str(s) for s in items)
        fmt = {_UINT32: "<u4", _INT32: "<i4", _FLOAT32: "<f4"}[etype]
        return out + np.asarray(items, dtype=fmt).tobytes()
    fmt = {_UINT32: "<I", _INT32: "<i", _FLOAT32: "<f", _BOOL: "<?"}[vtype]
    return out + struct.pack(fmt, value)


def _pad(n, align=ALIGNMENT):
    return (align - n % align) % align


def _tokenizer(vocab):
    if vocab <= FIRST_NORMAL_ID:
        raise ValueError("vocab must be larger than %d" % FIRST_NORMAL_ID)
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    tokens += ["\u2581t%d" % i for i in range(FIRST_NORMAL_ID, vocab)]
    types = [_TOK_UNKNOWN, _TOK_CONTROL, _TOK_CONTROL] + [_TOK_BYTE] * 256
    types += [_TOK_NORMAL] * (vocab - FIRST_NORMAL_ID)
    scores = np.zeros(vocab, dtype=np.float32)
    scores[FIRST_NORMAL_ID:] = -np.arange(vocab - FIRST_NORMAL_ID, dtype=np.float32)
    return tokens, scores, types


def _to_bf16_bits(x):
    """float32 array -> uint16 bfloat16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def _tensors(shape):
    """(name, numpy shape (outer..inner), is_norm) in llama.cpp's order."""
    v, d, h, kvh, f = (shape[k] for k in ("vocab", "d", "heads", "kv_heads", "hidden"))
    hd = d // h
    out = [("token_embd.weight", (v, d), False)]
    for i in range(shape["layers"]):
        p = "blk.%d." % i
        out += [
            (p + "attn_norm.weight", (d,), True),
            (p + "attn_q.weight", (h * hd, d), False),
            (p + "attn_k.weight", (kvh * hd, d), False),
            (p + "attn_v.weight", (kvh * hd, d), False),
            (p + "attn_output.weight", (d, h * hd), False),
            (p + "ffn_norm.weight", (d,), True),
            (p + "ffn_gate.weight", (f, d), False),
            (p + "ffn_up.weight", (f, d), False),
            (p + "ffn_down.weight", (d, f), False),
        ]
    out += [("output_norm.weight", (d,), True), ("output.weight", (v, d), False)]
    return out


def write_llama_gguf(path, shape, dtype, seed=0, context_length=2048,
                     rms_eps=1e-5, rope_theta=10000.0, std=0.02):
    """Writes a GGUF v3 file of a Llama model with random weights.

    shape: dict(vocab, d, heads, kv_heads, hidden, layers). dtype: "f16" or
    "bf16" for the matrices; norm weights are F32 ones. Weights are
    normal(0, std) so activations stay finite. Returns the file size.
    """
    if dtype not in _GGML_TYPE:
        raise ValueError("dtype must be 'f16' or 'bf16', not %r" % (dtype,))
    d, heads = shape["d"], shape["heads"]
    if d % heads or heads % shape["kv_heads"]:
        raise ValueError("d must divide by heads, heads by kv_heads: %r" % (shape,))
    head_dim = d // heads
    tokens, scores, types = _tokenizer(shape["vocab"])

    kvs = [
        _kv("general.architecture", _STRING, "llama"),
        _kv("general.name", _STRING, "random-llama-%dL-%dd" % (shape["layers"], d)),
        _kv("general.file_type", _UINT32, _FILE_TYPE[dtype]),
        _kv("general.alignment", _UINT32, ALIGNMENT),
        _kv("llama.vocab_size", _UINT32, shape["vocab"]),
        _kv("llama.context_length", _UINT32, context_length),
        _kv("llama.embedding_length", _UINT32, d),
        _kv("llama.block_count", _UINT32, shape["layers"]),
        _kv("llama.feed_forward_length", _UINT32, shape["hidden"]),
        _kv("llama.rope.dimension_count", _UINT32, head_dim),
        _kv("llama.rope.freq_base", _FLOAT32, rope_theta),
        _kv("llama.attention.head_count", _UINT32, heads),
        _kv("llama.attention.head_count_kv", _UINT32, shape["kv_heads"]),
        _kv("llama.attention.layer_norm_rms_epsilon", _FLOAT32, rms_eps),
        _kv("tokenizer.ggml.model", _STRING, "llama"),
        _kv("tokenizer.ggml.tokens", _ARRAY, (_STRING, tokens)),
        _kv("tokenizer.ggml.scores", _ARRAY, (_FLOAT32, scores)),
        _kv("tokenizer.ggml.token_type", _ARRAY, (_INT32, types)),
        _kv("tokenizer.ggml.unknown_token_id", _UINT32, UNK_ID),
        _kv("tokenizer.ggml.bos_token_id", _UINT32, BOS_ID),
        _kv("tokenizer.ggml.eos_token_id", _UINT32, EOS_ID),
        _kv("tokenizer.ggml.add_bos_token", _BOOL, True),
        _kv("tokenizer.ggml.add_eos_token", _BOOL, False),
    ]

    tensors = _tensors(shape)
    infos, offset = [], 0
    for name, shp, is_norm in tensors:
        gtype = GGML_TYPE_F32 if is_norm else _GGML_TYPE[dtype]
        nbytes = int(np.prod(shp)) * (4 if is_norm else 2)
        ne = tuple(reversed(shp))  # ne[0] is the innermost (contiguous) dim
        infos.append(_str(name) + struct.pack("<I", len(ne))
                     + struct.pack("<%dQ" % len(ne), *ne)
                     + struct.pack("<IQ", gtype, offset))
        offset += nbytes + _pad(nbytes)

    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs)))
        for kv in kvs:
            f.write(kv)
        for info in infos:
            f.write(info)
        f.write(b"\0" * _pad(f.tell()))
        for name, shp, is_norm in tensors:
            if is_norm:
                data = np.ones(shp, dtype="<f4")
            else:
                w = rng.standard_normal(shp, dtype=np.float32)
                w *= std
                data = w.astype("<f2") if dtype == "f16" else _to_bf16_bits(w)
            b = data.tobytes()
            f.write(b)
            f.write(b"\0" * _pad(len(b)))
        return f.tell()


if __name__ == "__main__":
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run import SHAPES  # noqa: E402

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=sorted(_GGML_TYPE), default="f16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_llama_gguf(a.path, SHAPES[a.shape], a.dtype, a.seed), "bytes")
