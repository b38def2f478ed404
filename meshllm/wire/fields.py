"""The bounds and field types every wire message is built from: ids, names, counts, times,
layers, positions, hidden-state payloads (meshllm.wire.messages, meshllm.wire.tune_messages)."""

from __future__ import annotations

from typing import Annotated

from meshllm.wire.schema import Float, Struct, Text, TupleOf, UInt
from meshllm.wire.tensor import CODECS, TensorPayload

MAX_ID_CHARS = 64
MAX_NAME_CHARS = 64
MAX_STATE_CHARS = 32
MAX_REASON_CHARS = 1024
MAX_STAGES = 256
MAX_LAYERS = 65536
MAX_POSITIONS = 2**24
MAX_LINKS = 64
"""Peers one LinkReport may describe (a larger mesh reports its first 64 by id)."""
MAX_REPORT_MS = 3_600_000.0
"""Bound on every time a LinkReport carries (an hour: the bound of a latency target)."""
MAX_RATE_MB_S = 100_000.0
"""Bound on a link rate (meshllm.placement.linkstats caps its figures here)."""

NodeId = Annotated[str, Text(min_len=1, max_len=MAX_ID_CHARS)]
SessionId = Annotated[str, Text(min_len=1, max_len=MAX_ID_CHARS)]
Name = Annotated[str, Text(max_len=MAX_NAME_CHARS)]
Term = Annotated[int, UInt()]
Count = Annotated[int, UInt()]
ByteCount = Annotated[int, UInt()]
Layer = Annotated[int, UInt(max_value=MAX_LAYERS)]
Position = Annotated[int, UInt(max_value=MAX_POSITIONS)]
Milliseconds = Annotated[float, Float(min_value=0.0, max_value=1e9)]
Seconds = Annotated[float, Float(min_value=0.0)]
Score = Annotated[float, Float()]
Reason = Annotated[str, Text(max_len=MAX_REASON_CHARS)]
CodecName = Annotated[str, Text(max_len=8, choices=CODECS)]
Hidden = Annotated[TensorPayload, Struct(TensorPayload)]
ReportMs = Annotated[float, Float(min_value=0.0, max_value=MAX_REPORT_MS)]
Rate = Annotated[float, Float(min_value=0.0, max_value=MAX_RATE_MB_S)]
Route = Annotated[tuple[str, ...], TupleOf(Text(min_len=1, max_len=MAX_ID_CHARS), MAX_STAGES)]
