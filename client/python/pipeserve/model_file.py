"""Reads and writes pipeserve model files (`.psm`).

A model file is a serialized `pipeserve.Graph` (proto/model.proto) followed by
the raw bytes of every parameter and buffer the graph uses. The C++ reader
(runtime/model_file.h) is written from the same layout:

    offset 0 : 8 bytes magic b"PIPESRV1"
    offset 8 : uint64 little-endian H = byte length of the header
    offset 16: header = serialized pipeserve.Graph, H bytes
    zero padding up to D = the first multiple of 64 at or after 16 + H
    data     : tensor i's bytes (little-endian, row-major, in its dtype) at
               D + params[i].offset; offsets are multiples of 64 with zero
               padding between; the file ends after the last tensor's bytes
               (at D when there are none).

    TensorInfo.byte_size = numel * element size (4 FP32/INT32, 2 FP16/BF16,
                           8 INT64, 1 BOOL)
    TensorInfo.crc32     = zlib.crc32(bytes) & 0xffffffff

Usage:

    from pipeserve.model_file import load_model
    graph, tensors = load_model("model.psm")   # verifies sizes and CRCs
    print(graph.params[0].fqn, tensors[graph.params[0].fqn].shape)

`write_model` is what `pipeserve.export` calls; it writes `path + ".tmp"` and
renames it over `path`, so readers never see a half-written file.
"""

import os
import struct
import zlib

import numpy as np

from ._proto import load_proto

model_pb2 = load_proto("model.proto")

MAGIC = b"PIPESRV1"
ALIGNMENT = 64
_PREFIX = struct.Struct("<8sQ")  # magic, header length
# Tensors are hashed and written in slices, so a tensor of several GiB never
# needs a second copy in memory.
_CHUNK = 64 << 20


class ModelFormatError(ValueError):
    """A model file is malformed or corrupt; the message says where."""


def _align(n):
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


# numpy dtype of each DataType's stored bytes. numpy has no bfloat16: BF16
# tensors are read and written as their uint16 bit patterns.
NUMPY_DTYPES = {
    model_pb2.DT_FLOAT32: np.dtype("<f4"),
    model_pb2.DT_FLOAT16: np.dtype("<f2"),
    model_pb2.DT_BFLOAT16: np.dtype("<u2"),
    model_pb2.DT_INT64: np.dtype("<i8"),
    model_pb2.DT_INT32: np.dtype("<i4"),
    model_pb2.DT_BOOL: np.dtype("?"),
}


def _bytes_view(array):
    """A flat byte view of a contiguous little-endian array."""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    view = memoryview(np.ascontiguousarray(array))
    return view.cast("B") if view.nbytes else memoryview(b"")  # no cast with a 0 in the shape


def _crc32(view):
    crc = 0
    for i in range(0, len(view), _CHUNK):
        crc = zlib.crc32(view[i:i + _CHUNK], crc)
    return crc & 0xffffffff


def write_model(path, graph, arrays):
    """Fills in graph.params' offset, byte_size and crc32 and writes the file.

    Args:
      path: destination; written as path + ".tmp", then renamed over path.
      graph: a model_pb2.Graph whose `params` list fqn, dtype, shape,
        is_buffer and in_state_dict. Modified in place.
      arrays: one numpy array per graph.params entry, same order, in the
        entry's dtype (NUMPY_DTYPES; BF16 as uint16 bit patterns).
    """
    if len(arrays) != len(graph.params):
        raise ValueError(f"{len(arrays)} arrays for {len(graph.params)} params")
    views = [_bytes_view(a) for a in arrays]
    offset = 0
    for info, view in zip(graph.params, views):
        offset = _align(offset)
        info.offset = offset
        info.byte_size = len(view)
        info.crc32 = _crc32(view)
        offset += len(view)

    header = graph.SerializeToString()
    data_start = _align(_PREFIX.size + len(header))
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, len(header)))
            f.write(header)
            f.write(b"\0" * (data_start - _PREFIX.size - len(header)))
            for info, view in zip(graph.params, views):
                f.write(b"\0" * (data_start + info.offset - f.tell()))
                for i in range(0, len(view), _CHUNK):
                    f.write(view[i:i + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_model(path):
    """Reads a model file and verifies it.

    Returns:
      (graph, tensors): the model_pb2.Graph header and a dict from each stored
      tensor's FQN (graph.params[i].fqn) to a numpy array of its shape and
      dtype (NUMPY_DTYPES: BF16 as uint16 bit patterns).

    Raises:
      ModelFormatError: bad magic, truncated or oversized file, a tensor that
        is misaligned, overlaps another, has the wrong size or a bad CRC.
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(_PREFIX.size)
        if len(prefix) != _PREFIX.size:
            raise ModelFormatError(f"{path}: {file_size} bytes is too short "
                                   "for a model file")
        magic, header_size = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ModelFormatError(f"{path}: bad magic {magic!r}, expected "
                                   f"{MAGIC!r}")
        if _PREFIX.size + header_size > file_size:
            raise ModelFormatError(f"{path}: header of {header_size} bytes "
                                   f"runs past the end of the file "
                                   f"({file_size} bytes)")
        graph = model_pb2.Graph()
        try:
            graph.ParseFromString(f.read(header_size))
        except Exception as e:  # protobuf's DecodeError
            raise ModelFormatError(f"{path}: header does not parse as "
                                   f"pipeserve.Graph: {e}") from e
        data_start = _align(_PREFIX.size + header_size)

        tensors = {}
        end = data_start
        for info in sorted(graph.params, key=lambda p: p.offset):
            where = f"{path}: tensor '{info.fqn}'"
            if info.fqn in tensors:
                raise ModelFormatError(f"{where} is stored twice")
            np_dtype = NUMPY_DTYPES.get(info.dtype)
            if np_dtype is None:
                raise ModelFormatError(f"{where}: unknown dtype {info.dtype}")
            numel = int(np.prod(info.shape, dtype=np.int64))
            if info.byte_size != numel * np_dtype.itemsize:
                raise ModelFormatError(f"{where}: byte_size {info.byte_size} "
                                       f"does not match shape "
                                       f"{list(info.shape)} "
                                       f"({numel * np_dtype.itemsize})")
            if info.offset % ALIGNMENT:
                raise ModelFormatError(f"{where}: offset {info.offset} is not "
                                       f"a multiple of {ALIGNMENT}")
            if data_start + info.offset < end:
                raise ModelFormatError(f"{where}: offset {info.offset} overlaps "
                                       "the previous tensor")
            if data_start + info.offset + info.byte_size > file_size:
                raise ModelFormatError(f"{where}: bytes [{info.offset}, "
                                       f"{info.offset + info.byte_size}) of the "
                                       f"data section run past the end of the "
                                       f"file ({file_size} bytes)")
            f.seek(data_start + info.offset)
            buf = bytearray(info.byte_size)
            f.readinto(buf)
            crc = _crc32(memoryview(buf))
            if crc != info.crc32:
                raise ModelFormatError(f"{where}: crc32 {crc:#010x} does not "
                                       f"match the header's {info.crc32:#010x}")
            tensors[info.fqn] = np.frombuffer(buf, dtype=np_dtype).reshape(
                tuple(info.shape))
            end = data_start + info.offset + info.byte_size
        if file_size != end:
            raise ModelFormatError(f"{path}: file is {file_size} bytes, "
                                   f"expected {end} (end of the last tensor)")
    return graph, tensors
