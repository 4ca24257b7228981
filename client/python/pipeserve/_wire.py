"""KServe v2 inference messages without copying tensor bytes through
protobuf.

protobuf's Python API copies a `bytes` field twice on the way in (parse,
then again each time the field is read) and twice on the way out (append,
then serialize). For a 200 MB output that is most of a request's time on
the client. So the client sends and receives ModelInfer as raw bytes:

- a request is the small message (names, shapes, parameters) serialized by
  protobuf, followed by one `raw_input_contents` field per input written
  here straight from the array's buffer (protobuf parsers accept fields in
  any order and append repeated ones);
- a response is split here: the `raw_output_contents` fields are located
  (offset and length into the received bytes, nothing copied) and the rest,
  a few hundred bytes, is parsed by protobuf.
"""

# Field numbers in grpc_service.proto.
RAW_INPUT_CONTENTS = 7   # ModelInferRequest.raw_input_contents
RAW_OUTPUT_CONTENTS = 6  # ModelInferResponse.raw_output_contents

_LENGTH_DELIMITED = 2


class MalformedMessage(ValueError):
    """The bytes are not a protobuf message (truncated or corrupt)."""


def _varint(n):
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(data, pos):
    result, shift = 0, 0
    while True:
        if pos >= len(data):
            raise MalformedMessage(f"a varint runs past the end at byte {pos}")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MalformedMessage(f"a varint longer than 10 bytes at byte {pos}")


def encode_request(head, raws):
    """A serialized ModelInferRequest: `head` (the request serialized
    without raw_input_contents) and then each buffer in `raws` (bytes-like,
    C-contiguous) as a raw_input_contents field. One copy of each buffer."""
    parts = [head]
    key = _varint((RAW_INPUT_CONTENTS << 3) | _LENGTH_DELIMITED)
    for raw in raws:
        # An array with a 0 in its shape has no bytes, and memoryview
        # cannot cast it.
        view = memoryview(raw)
        view = view.cast("B") if view.nbytes else memoryview(b"")
        parts += [key, _varint(view.nbytes), view]
    return b"".join(parts)


def split_response(data):
    """Splits a serialized ModelInferResponse into (rest, raws): `rest` the
    bytes of every field but raw_output_contents (for protobuf to parse),
    `raws` a list of (offset, length) of each raw_output_contents' bytes in
    `data`, in order. Raises MalformedMessage."""
    rest, raws = [], []
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise MalformedMessage(f"field number 0 at byte {start}")
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            if field == RAW_OUTPUT_CONTENTS:
                if pos + length > end:
                    raise MalformedMessage(
                        f"raw_output_contents {len(raws)} needs {length} bytes, "
                        f"{end - pos} left")
                raws.append((pos, length))
                pos += length
                continue
            pos += length
        else:
            raise MalformedMessage(f"field {field} has wire type {wire_type} at byte {start}")
        if pos > end:
            raise MalformedMessage(f"field {field} at byte {start} runs past the end")
        rest.append(bytes(memoryview(data)[start:pos]))
    return b"".join(rest), raws
