#!/usr/bin/env python3
"""Writes small, valid, hand-built GGUF files into a folder, as seeds for the GGUF fuzz target.

usage: scripts/gen-gguf-seeds.py OUT_DIR

Together the seeds cover every metadata value type, arrays of every element type (strings
included, empty arrays too), GGUF versions 2 and 3, tensors of several dtypes and shapes, the
default alignment and custom general.alignment values. Standard library only.
"""
import os
import struct
import sys

# GGUF metadata value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
              BOOL: "<B", U64: "<Q", I64: "<q", F64: "<d"}

# tensor types: id -> (block size, bytes per block)
DTYPES = {"f32": (0, 1, 4), "f16": (1, 1, 2), "q4_0": (2, 32, 18), "q4_1": (3, 32, 20),
          "q5_0": (6, 32, 22), "q5_1": (7, 32, 24), "q8_0": (8, 32, 34), "q2_K": (10, 256, 84),
          "q3_K": (11, 256, 110), "q4_K": (12, 256, 144), "q5_K": (13, 256, 176),
          "q6_K": (14, 256, 210), "q8_K": (15, 256, 292), "bf16": (30, 1, 2)}


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(t, v):
    if t == STR:
        return gstr(v)
    if t == ARR:
        et, items = v
        out = struct.pack("<IQ", et, len(items))
        for it in items:
            out += value(et, it)
        return out
    return struct.pack(SCALAR_FMT[t], v)


def gguf(kvs, tensors, version=3, alignment=None, tail=b""):
    """kvs: [(key, type, value)]; tensors: [(name, dtype, dims)]. Tensor data is a byte ramp."""
    align = alignment if alignment is not None else 32
    if alignment is not None:
        kvs = kvs + [("general.alignment", U32, alignment)]
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, t, v in kvs:
        out += gstr(key) + struct.pack("<I", t) + value(t, v)
    offset, sizes = 0, []
    for name, dt, dims in tensors:
        tid, bs, bb = DTYPES[dt]
        rows = 1
        for d in dims[1:]:
            rows *= d
        size = dims[0] // bs * bb * rows
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(
            struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", tid, offset)
        sizes.append((offset, size))
        offset = (offset + size + align - 1) // align * align
    if tensors:
        out += b"\0" * (-len(out) % align)
        data = bytearray()
        for off, size in sizes:
            data += b"\0" * (off - len(data))
            data += bytes((off + i) & 0xFF for i in range(size))
        out += bytes(data)
    return out + tail


def every_type_kvs():
    return [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "seed \u00e9\u4e2d"),
        ("t.u8", U8, 200), ("t.i8", I8, -100), ("t.u16", U16, 60000), ("t.i16", I16, -30000),
        ("t.u32", U32, 4000000000), ("t.i32", I32, -2000000000), ("t.f32", F32, 1e-5),
        ("t.bool", BOOL, 1), ("t.bool0", BOOL, 0), ("t.u64", U64, 2**64 - 1),
        ("t.i64", I64, -2**63), ("t.f64", F64, 3.141592653589793), ("t.empty", STR, ""),
        ("llama.embedding_length", U32, 64), ("llama.block_count", U32, 2),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-6),
    ]


def every_array_kvs():
    kvs = [
        ("a.u8", ARR, (U8, [0, 1, 255])), ("a.i8", ARR, (I8, [-128, 0, 127])),
        ("a.u16", ARR, (U16, [1, 65535])), ("a.i16", ARR, (I16, [-32768, 32767])),
        ("a.u32", ARR, (U32, list(range(10)))), ("a.i32", ARR, (I32, [-1, 0, 1])),
        ("a.f32", ARR, (F32, [0.5, -2.0, 1e30])), ("a.bool", ARR, (BOOL, [1, 0, 1])),
        ("a.u64", ARR, (U64, [2**63])), ("a.i64", ARR, (I64, [-5])),
        ("a.f64", ARR, (F64, [1.0, -0.0])), ("a.empty", ARR, (I32, [])),
        ("a.empty_str", ARR, (STR, [])),
        ("tokenizer.ggml.tokens", ARR, (STR, ["<unk>", "<s>", "</s>", "", "a" * 50, "\u2581the",
                                             "x", "y", "z"])),
        ("tokenizer.ggml.scores", ARR, (F32, [0.0, -1.0, -2.0, 0, 0, 0, 0, 0, 0])),
    ]
    return kvs


def seeds():
    yield "header-only-v3", gguf(every_type_kvs(), [])
    yield "header-only-v2", gguf(every_type_kvs(), [], version=2)
    yield "arrays", gguf(every_array_kvs(), [])
    yield "empty", gguf([], [])
    yield "one-f32", gguf([("general.architecture", STR, "llama")],
                          [("token_embd.weight", "f32", [4, 3])])
    yield "dtypes", gguf(every_type_kvs()[:3], [
        ("w.f32", "f32", [8]), ("w.f16", "f16", [16, 2]), ("w.bf16", "bf16", [8, 1, 2]),
        ("w.q4_0", "q4_0", [32, 2]), ("w.q8_0", "q8_0", [64]), ("w.q4_K", "q4_K", [256]),
        ("w.q6_K", "q6_K", [256, 1, 1, 1])])
    yield "quants", gguf([], [(f"w.{n}", n, [256]) for n in DTYPES])
    yield "align-64", gguf(every_array_kvs()[:4], [("a", "f32", [3]), ("b", "f16", [5])],
                           alignment=64)
    yield "align-1", gguf([("k", U8, 1)], [("a", "f32", [1]), ("b", "q8_0", [32])], alignment=1)
    yield "align-4096", gguf([], [("a", "f32", [2])], alignment=4096)
    yield "all", gguf(every_type_kvs() + every_array_kvs(),
                      [("token_embd.weight", "f32", [8, 9]), ("output_norm.weight", "f16", [8]),
                       ("blk.0.attn_q.weight", "q8_0", [32, 8])], alignment=16)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(out, f"seed-{name}.gguf"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
