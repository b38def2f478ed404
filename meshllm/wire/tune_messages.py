"""The federated fine-tuning messages (tags 23-29, docs/fine-tuning.md): their bounds and
checks. Part of :mod:`meshllm.wire.messages`, which gives them their tags."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from meshllm.errors import WireError
from meshllm.wire.schema import Float, Struct, Text, TupleOf, UInt, WireStruct
from meshllm.wire.tensor import TensorPayload
from meshllm.wire.fields import MAX_ID_CHARS, Reason

#
# Only counts, a loss figure, adapter tensor names and adapter tensors cross the wire: never
# text or token ids of anyone's training data.

TUNE_AGGREGATES: tuple[str, ...] = ("mean", "median", "trimmed")
"""How a round's updates are combined (meshllm.tune.aggregate.AGGREGATES)."""
TUNE_TENSOR_KINDS: tuple[str, ...] = ("global", "update", "final")
MAX_TUNE_ROUNDS = 10_000
MAX_TUNE_RANK = 1024
MAX_TUNE_ALPHA = 1e6
MAX_TUNE_STEPS = 10_000_000
MAX_TUNE_EXAMPLES = 2**40
MAX_TUNE_LOSS = 1e9
MAX_TUNE_PARTICIPANTS = 256
MAX_TUNE_PARTS = 4096
"""Parts of one adapter: 4,096 parts of up to 64 tensors each."""
MAX_TUNE_TENSORS_PER_PART = 64
MAX_TUNE_NAME_CHARS = 160
MAX_TUNE_PART_BYTES = 4 * 2**20
"""A part of several tensors carries at most 4 MiB of float32 values; a larger tensor travels
alone in its part (up to MAX_TUNE_TENSOR_ELEMENTS)."""
MAX_TUNE_TENSOR_ELEMENTS = 2**23
"""One adapter tensor: at most 2**23 elements (32 MiB as float32)."""
TUNE_DIGEST_CHARS = 64

JobId = Annotated[str, Text(min_len=1, max_len=MAX_ID_CHARS)]
MaybeJobId = Annotated[str, Text(max_len=MAX_ID_CHARS)]
TuneRoundNo = Annotated[int, UInt(max_value=MAX_TUNE_ROUNDS + 1)]
TuneRounds = Annotated[int, UInt(min_value=1, max_value=MAX_TUNE_ROUNDS)]
TuneRank = Annotated[int, UInt(min_value=1, max_value=MAX_TUNE_RANK)]
TuneAlpha = Annotated[float, Float(min_value=0.0, max_value=MAX_TUNE_ALPHA)]
TuneSteps = Annotated[int, UInt(min_value=1, max_value=MAX_TUNE_STEPS)]
TuneAggregate = Annotated[str, Text(max_len=16, choices=TUNE_AGGREGATES)]
TuneLoss = Annotated[float, Float(min_value=0.0, max_value=MAX_TUNE_LOSS)]
TuneParts = Annotated[int, UInt(min_value=1, max_value=MAX_TUNE_PARTS)]
Participants = Annotated[
    tuple[str, ...], TupleOf(Text(min_len=1, max_len=MAX_ID_CHARS), MAX_TUNE_PARTICIPANTS)
]


def _check_alpha(owner: str, alpha: float) -> None:
    if not alpha > 0.0:
        raise WireError(f"{owner}.alpha: {alpha} must be above 0")


def _check_distinct(where: str, items: tuple[str, ...]) -> None:
    if len(set(items)) != len(items):
        raise WireError(f"{where}: an item is listed twice")


@dataclass(frozen=True)
class TuneJoin(WireStruct):
    """To the coordinator: the sender joins the mesh's tune job with its own data, or starts one
    with these settings when there is none. ``examples`` is how many examples it holds."""

    rounds: TuneRounds
    rank: TuneRank
    alpha: TuneAlpha
    steps: TuneSteps
    """Optimizer steps each participant runs per round."""
    aggregate: TuneAggregate
    examples: Annotated[int, UInt(min_value=1, max_value=MAX_TUNE_EXAMPLES)]

    def _check_invariants(self) -> None:
        _check_alpha("TuneJoin", self.alpha)


@dataclass(frozen=True)
class TuneAccepted(WireStruct):
    """The coordinator to a joiner: it is in job ``job_id`` from round ``round`` on (a round
    past ``rounds``: the job is in its last round; the joiner still gets the final adapter)."""

    job_id: JobId
    round: TuneRoundNo
    rounds: TuneRounds
    rank: TuneRank
    alpha: TuneAlpha
    steps: TuneSteps
    aggregate: TuneAggregate

    def _check_invariants(self) -> None:
        _check_alpha("TuneAccepted", self.alpha)


@dataclass(frozen=True)
class TuneQuit(WireStruct):
    """To the coordinator: the sender leaves the job (empty ``job_id``: whatever job it is in)."""

    job_id: MaybeJobId


@dataclass(frozen=True)
class TuneRound(WireStruct):
    """The coordinator to each participant of round ``round``: train from the global adapter,
    which follows in ``parts`` `TuneTensors` of kind ``global``."""

    job_id: JobId
    round: Annotated[int, UInt(min_value=1, max_value=MAX_TUNE_ROUNDS)]
    rounds: TuneRounds
    rank: TuneRank
    alpha: TuneAlpha
    steps: TuneSteps
    aggregate: TuneAggregate
    participants: Participants
    """The round's participants, sorted."""
    loss: TuneLoss
    """The previous round's mean training loss (weighted by examples); 0 before round 2."""
    parts: TuneParts

    def _check_invariants(self) -> None:
        _check_alpha("TuneRound", self.alpha)
        if self.round > self.rounds:
            raise WireError(f"TuneRound.round: {self.round} is past the job's {self.rounds} rounds")
        _check_distinct("TuneRound.participants", self.participants)


@dataclass(frozen=True)
class TuneTensors(WireStruct):
    """One part of an adapter: the coordinator's ``global`` adapter for a round, a participant's
    ``update`` (its trained adapter minus the global), or the ``final`` adapter of the job.

    ``names[i]`` is the name of ``tensors[i]`` (float32, codec ``f32``). Parts go in order
    ``0..parts-1``; each name appears in one part only. ``examples`` and ``loss`` are the
    participant's example count and mean training loss (an update's; 0 otherwise)."""

    job_id: JobId
    round: TuneRoundNo
    kind: Annotated[str, Text(max_len=8, choices=TUNE_TENSOR_KINDS)]
    part: Annotated[int, UInt(max_value=MAX_TUNE_PARTS - 1)]
    parts: TuneParts
    examples: Annotated[int, UInt(max_value=MAX_TUNE_EXAMPLES)]
    loss: TuneLoss
    names: Annotated[
        tuple[str, ...],
        TupleOf(Text(min_len=1, max_len=MAX_TUNE_NAME_CHARS), MAX_TUNE_TENSORS_PER_PART, min_len=1),
    ]
    tensors: Annotated[
        tuple[TensorPayload, ...], TupleOf(Struct(TensorPayload), MAX_TUNE_TENSORS_PER_PART, min_len=1)
    ]

    def _check_invariants(self) -> None:
        if self.part >= self.parts:
            raise WireError(f"TuneTensors.part: {self.part} is not below parts {self.parts}")
        if len(self.names) != len(self.tensors):
            raise WireError(f"TuneTensors: {len(self.names)} names for {len(self.tensors)} tensors")
        _check_distinct("TuneTensors.names", self.names)
        total = 0
        for name, tensor in zip(self.names, self.tensors):
            if tensor.codec != "f32":
                raise WireError(f"TuneTensors.tensors: {name} has codec {tensor.codec}; only f32")
            elements = math.prod(tensor.shape)
            if elements > MAX_TUNE_TENSOR_ELEMENTS:
                raise WireError(f"TuneTensors.tensors: {name} has {elements} elements; "
                                f"at most {MAX_TUNE_TENSOR_ELEMENTS}")
            total += 4 * elements
        if len(self.tensors) > 1 and total > MAX_TUNE_PART_BYTES:
            raise WireError(f"TuneTensors: {total} bytes of tensors in one part; at most "
                            f"{MAX_TUNE_PART_BYTES} (a larger tensor travels alone)")


@dataclass(frozen=True)
class TuneRefused(WireStruct):
    """The sender refuses something of job ``job_id`` (empty: no job).

    From the coordinator: ``round`` 0 refuses the receiver's join (it is not in the job);
    ``round`` r refuses its update for round r (it stays in the job). From a participant: it has
    nothing for round ``round`` (its training failed, or the global adapter was bad)."""

    job_id: MaybeJobId
    round: TuneRoundNo
    reason: Reason


@dataclass(frozen=True)
class TuneDone(WireStruct):
    """The coordinator to every member: job ``job_id`` is over after ``rounds`` rounds; its
    final adapter follows in ``parts`` `TuneTensors` of kind ``final``. ``digest``: the
    adapter's sha256 (meshllm.tune.rounds.adapter_digest), lowercase hex."""

    job_id: JobId
    rounds: TuneRounds
    rank: TuneRank
    alpha: TuneAlpha
    participants: Participants
    """Nodes whose updates went into the adapter, sorted."""
    loss: TuneLoss
    """The last round's mean training loss (weighted by examples); 0 when unknown."""
    digest: Annotated[str, Text(min_len=TUNE_DIGEST_CHARS, max_len=TUNE_DIGEST_CHARS)]
    parts: TuneParts

    def _check_invariants(self) -> None:
        _check_alpha("TuneDone", self.alpha)
        _check_distinct("TuneDone.participants", self.participants)
        if not all(c in "0123456789abcdef" for c in self.digest):
            raise WireError("TuneDone.digest: not lowercase hex")


