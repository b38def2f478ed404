"""A structural check of CBOR bytes, run before cbor2 sees them.

cbor2 (6.3) alone would accept things a network peer must not be able to send us: trailing
bytes after the item (silently ignored), semantic tags that build arbitrary objects (regular
expressions, dates, shared references that make cyclic lists, ...), maps, undefined and other
simple values, and it has a nesting limit of 400. So :func:`check_cbor` walks the item
headers first, without building anything, and accepts only the subset meshllm writes:

- exactly one data item covering all the bytes;
- unsigned/negative integers, byte strings, UTF-8 strings (validity is cbor2's check), arrays,
  false/true/null and 64-bit floats;
- definite lengths only, every length and integer in its shortest form (so one message has
  exactly one encoding and ``encode(decode(frame)) == frame``);
- at most ``max_depth`` nested arrays, ``max_array_len`` items in one array and ``max_items``
  items in all; every declared length fits in the bytes that are actually there.

The walk is iterative (no recursion) and allocates nothing in proportion to declared lengths.
"""

from dataclasses import dataclass

from meshllm.errors import WireError

_MAJOR_UINT, _MAJOR_NINT, _MAJOR_BYTES, _MAJOR_TEXT = 0, 1, 2, 3
_MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG, _MAJOR_SIMPLE = 4, 5, 6, 7
_SIMPLE_FALSE, _SIMPLE_TRUE, _SIMPLE_NULL, _FLOAT64 = 20, 21, 22, 27
_ARG_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}
_ARG_MIN = {24: 24, 25: 2**8, 26: 2**16, 27: 2**32}


@dataclass(frozen=True)
class CborLimits:
    """Bounds on the shape of one decoded message."""

    max_depth: int = 8
    """Most arrays nested in one another (a message uses 3)."""
    max_array_len: int = 1024
    """Most items in one array."""
    max_items: int = 8192
    """Most data items in the whole message."""


def check_cbor(data: bytes, limits: CborLimits = CborLimits()) -> None:
    """Raise WireError unless ``data`` is exactly one item of meshllm's CBOR subset."""
    size = len(data)
    pos = 0
    items = 0
    remaining = [1]  # items still to read in each open array; [0] is the top level
    while remaining:
        if remaining[-1] == 0:
            remaining.pop()
            continue
        remaining[-1] -= 1
        items += 1
        if items > limits.max_items:
            raise WireError(f"CBOR: more than {limits.max_items} data items")
        if pos >= size:
            raise WireError("CBOR: truncated (data ends inside an item)")
        major, info = data[pos] >> 5, data[pos] & 0x1F
        pos += 1
        if major == _MAJOR_SIMPLE:
            if info in (_SIMPLE_FALSE, _SIMPLE_TRUE, _SIMPLE_NULL):
                continue
            if info == _FLOAT64:
                if size - pos < 8:
                    raise WireError("CBOR: truncated float")
                pos += 8
                continue
            raise WireError(f"CBOR: simple value or float encoding 0x{data[pos - 1]:02x} not allowed")
        if major == _MAJOR_MAP:
            raise WireError("CBOR: maps are not allowed")
        if major == _MAJOR_TAG:
            raise WireError("CBOR: tags are not allowed")
        if info < 24:
            arg = info
        elif info in _ARG_BYTES:
            width = _ARG_BYTES[info]
            if size - pos < width:
                raise WireError("CBOR: truncated item header")
            arg = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            if arg < _ARG_MIN[info]:
                raise WireError("CBOR: length or integer not in its shortest form")
        elif info == 31:
            raise WireError("CBOR: indefinite lengths are not allowed")
        else:
            raise WireError(f"CBOR: reserved header 0x{data[pos - 1]:02x}")
        if major in (_MAJOR_UINT, _MAJOR_NINT):
            continue
        if major in (_MAJOR_BYTES, _MAJOR_TEXT):
            if arg > size - pos:
                raise WireError(
                    f"CBOR: string declares {arg} bytes but only {size - pos} bytes are left"
                )
            pos += arg
            continue
        # _MAJOR_ARRAY
        if len(remaining) > limits.max_depth:
            raise WireError(f"CBOR: arrays nested deeper than {limits.max_depth}")
        if arg > limits.max_array_len:
            raise WireError(f"CBOR: array of {arg} items; at most {limits.max_array_len}")
        if arg > size - pos:
            raise WireError(f"CBOR: array declares {arg} items but only {size - pos} bytes are left")
        remaining.append(arg)
    if pos != size:
        raise WireError(f"CBOR: {size - pos} trailing bytes after the message")
