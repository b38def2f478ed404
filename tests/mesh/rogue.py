"""A rogue peer for the tests: a hostile member of a mesh, made of the project's own link code.

A :class:`Rogue` is a :class:`daemon.net.links.LinkManager` in the test's event loop, with a
hello of the mesh's name and model id, so that real daemons take it as one of theirs when it
holds the mesh key (and refuse it when it does not). It dials the daemons' signaling ports
(``meshllm up --loopback``: 127.0.0.1 only) and then sends whatever a test asks:

- any wire message to a chosen peer (:meth:`Rogue.send`), with terms, ids and shapes no
  honest node sends;
- raw pieces on a channel, past the wire codec (:meth:`Rogue.send_pieces`): garbage, a text
  piece, random bytes, a piece of the largest size that is no message, a header that promises
  a huge message;
- an offer it made before, again (:meth:`Rogue.replay`): every offer the daemons accepted
  from it is kept in :attr:`Rogue.offers`.

What it hears back (plans, claims, results, refusals of its steps) is in
:attr:`Rogue.received`. The message builders below make the attacks of issue 20; the test
decides whom to send them to and what the daemons must still do.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import numpy as np

from daemon.net.links import LinkDown, LinkError, LinkManager, LinkUp
from daemon.net.signaling import SIGNAL_PATH
from meshllm import wire
from meshllm.wire import PROTOCOL_VERSION, Hello, Message
from meshllm.wire.framing import FRAME_HEADER_BYTES, MAX_FRAME_BYTES

__all__ = ["LinkError", "Rogue", "rogue_node_id"]


U63_MAX = 2**63 - 1
"""The largest term the wire carries: finding 1 of issue 20 ended every daemon with it."""


def rogue_node_id() -> str:
    """A node id of the daemons' form (``n-`` and 16 hex digits)."""
    return f"n-{secrets.token_hex(8)}"


class Rogue:
    """A hostile peer: links like a node, then sends what the test asks (module doc)."""

    def __init__(self, *, mesh_name: str, model_id: str, mesh_key: bytes | None, node_id: str | None = None,
                 name: str = "rogue", mem_budget_bytes: int = 0, ms_per_layer: float = 1.0,
                 can_coordinate: bool = False) -> None:
        """``mem_budget_bytes`` and ``ms_per_layer``: what its hello claims (a budget of 0
        holds no layers, so the mesh plans without it); ``can_coordinate``: it stands for
        coordinator (its election score then comes from the claim)."""
        self.hello = Hello(node_id or rogue_node_id(), name, PROTOCOL_VERSION, mesh_name, model_id, 9,
                           mem_budget_bytes, ms_per_layer, can_coordinate)
        self.received: list[tuple[str, Message]] = []
        """Every message a daemon sent it, with the sender."""
        self.ups: list[str] = []
        self.downs: list[LinkDown] = []
        self.offers: list[tuple[str, dict[str, Any]]] = []
        """(HOST:PORT, JSON body) of every offer a daemon accepted from it, in order."""
        self._message_ids: dict[tuple[str, str], int] = {}
        self.links = LinkManager(
            self.hello, loopback=True, mesh_key=mesh_key,
            # its own patience is long: the daemons decide when it is lost
            heartbeat_interval_s=0.2, lost_after_s=30.0,
            on_message=lambda peer, msg: self.received.append((peer, msg)),
            on_link_up=self._up, on_link_down=self.downs.append,
            is_compatible=lambda hello: None, probe_on_link_up=False, probe_interval_s=None,
            max_message_bytes=wire.DEFAULT_MAX_MESSAGE_BYTES)
        self._record_offers()

    @property
    def node_id(self) -> str:
        return self.hello.node_id

    def _up(self, event: LinkUp) -> None:
        self.ups.append(event.peer_id)

    def _record_offers(self) -> None:
        """Keep every offer that a daemon accepted (the link layer signs a new one per dial)."""
        endpoint = self.links._signaling  # noqa: SLF001 - a test's eavesdropper on its own signaling
        post = endpoint._post  # noqa: SLF001

        async def recording_post(address: str, host: str, port: int, body: dict[str, Any]) -> tuple[int, object]:
            status, answer = await post(address, host, port, body)
            if status == 200:
                self.offers.append((address, body))
            return status, answer

        endpoint._post = recording_post  # type: ignore[method-assign]  # noqa: SLF001

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.links.start()

    async def close(self) -> None:
        await self.links.close("the rogue leaves")

    async def link(self, address: str) -> str:
        """Link to the daemon whose signaling is at ``address`` (HOST:PORT); its node id.
        Raises LinkError when it refuses (no key, the wrong key)."""
        return await self.links.connect(address)

    def linked(self) -> set[str]:
        """The daemons it has a link up with."""
        return set(self.links.peers())

    def heard(self, kind: type[Message], sender: str | None = None) -> list[Message]:
        """The messages of one kind it got (from ``sender``, when given)."""
        return [m for peer, m in self.received if isinstance(m, kind) and sender in (None, peer)]

    # -- sending -------------------------------------------------------------------------------

    async def send(self, peer: str, msg: Message, channel: str = "control") -> None:
        """One message, as the link layer sends it (split into pieces, with backpressure)."""
        await self.links.send(peer, msg, channel=channel)

    async def send_all(self, peer: str, messages: Sequence[Message], channel: str = "control") -> int:
        """Send them in order; how many went (a link that drops ends the burst). The event
        loop runs between messages, so that the rogue's heartbeats keep going."""
        sent = 0
        for msg in messages:
            try:
                await self.send(peer, msg, channel)
            except LinkError:
                break
            sent += 1
            if sent % 16 == 0:
                await asyncio.sleep(0)
        return sent

    def send_pieces(self, peer: str, pieces: Sequence[bytes | str], channel: str = "control") -> None:
        """Raw data-channel pieces, past the codec and the framing: whatever bytes the test
        made. Raises LinkError without a link up."""
        link = self.links._table.up(peer)  # noqa: SLF001 - the raw channel under the link layer
        if link is None:
            raise LinkError(f"no link to {peer}", peer)
        for piece in pieces:
            link.channels[channel].dc.send(piece)

    def next_message_id(self, peer: str, channel: str) -> int:
        """A message id for raw pieces, clear of those the link layer uses (it counts up from 0)."""
        key = (peer, channel)
        self._message_ids[key] = self._message_ids.get(key, 2**31) + 1
        return self._message_ids[key]

    async def replay(self, address: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST a recorded offer to the daemon at ``address`` again: (HTTP status, JSON body)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(f"http://{address}{SIGNAL_PATH}", json=body) as response:
                return response.status, await response.json(content_type=None)


# --- the attacks ---------------------------------------------------------------------------------


def huge_terms(rogue: str, term_now: int) -> list[Message]:
    """Election messages with terms no honest mesh reaches: 2^63-1 (finding 1), 2^53 and just
    past it, and just past what one step may raise the term by."""
    from meshllm.mesh.election import MAX_TERM, MAX_TERM_STEP

    terms = (U63_MAX, U63_MAX - 1, MAX_TERM + 1, MAX_TERM, term_now + MAX_TERM_STEP + 1, term_now + 2 * MAX_TERM_STEP)
    out: list[Message] = []
    for term in terms:
        out += [wire.Coordinator(term, rogue), wire.Election(term, rogue, 1e300), wire.Answer(term, rogue)]
    return out


def election_storm(rogue: str, term_now: int, count: int) -> list[Message]:
    """``count`` elections and claims, each a term higher than the last."""
    out: list[Message] = []
    for i in range(count):
        term = term_now + 1 + i
        out += [wire.Election(term, rogue, float(i)), wire.Coordinator(term, rogue)]
    return out


def score_claims(rogue: str, term: int, epoch: int, others: Sequence[str]) -> list[Message]:
    """Reports that claim absurd capacity and speed, for the rogue and in others' names."""
    huge = 2**62
    out: list[Message] = []
    for node in (rogue, *others):
        out.append(wire.NodeReport(node, term, huge, 0.0, 0, 2**16, "ready"))
        out.append(wire.LinkReport(node, term, epoch, 0.0, 0.0, 0.0, 0.0, 2**40, True,
                                   wire.messages.MAX_REPORT_MS, 0.0,
                                   tuple(wire.LinkFigures(peer, 0.0, wire.messages.MAX_RATE_MB_S,
                                                          wire.messages.MAX_RATE_MB_S)
                                         for peer in (rogue, *others) if peer != node)))
    return out


@functools.cache
def hidden(rows: int, width: int, *, codec: str = "f32", seed: int = 0) -> wire.TensorPayload:
    """Random hidden states of ``rows`` x ``width`` (small values: they encode in any codec)."""
    values = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    return wire.encode_tensor(values, codec, compress=False)


def cache(kv_heads: int, positions: int, head_dim: int) -> wire.TensorPayload:
    values = np.random.default_rng(1).standard_normal((kv_heads, positions, head_dim)).astype(np.float32)
    return wire.encode_tensor(values, "f32", compress=False)


def session_ids(entries: Sequence[str], count: int) -> list[str]:
    """The ids an entry node gives its answers, ``<node id>/<counter>``: its first ``count``."""
    return [f"{entry}/{n}" for entry in entries for n in range(count)]


def forged_steps(sessions: Sequence[str], *, term: int, epoch: int, chain: Sequence[str], width: int,
                 seqs: Sequence[int], kv: tuple[int, int], layers: Sequence[int]) -> Iterator[Message]:
    """`Forward`, `Result`, `CacheHandover` and `StepFailed` for other nodes' sessions, each
    well formed, with the plan's key and, for a step, the route the plan gives it from its
    first stage (``chain``: the plan's stages)."""
    kv_heads, head_dim = kv
    keys = cache(kv_heads, 4, head_dim)
    for session in sessions:
        for layer in layers:
            yield wire.CacheHandover(session, term, epoch, layer, keys, keys)
    for seq in seqs:
        for session in sessions:
            entry = session.rpartition("/")[0]
            yield wire.Forward(session, seq, term, epoch, seq, hidden(1, width, seed=seq), tuple(chain[1:]) + (entry,))
            yield wire.Result(session, seq, hidden(1, width, seed=seq))
            yield wire.StepFailed(session, seq, "no_log" if seq % 2 else "stale_plan", "forged by a rogue")


def wrong_shapes(session: str, *, term: int, epoch: int, route: Sequence[str], width: int,
                 kv: tuple[int, int], layer: int) -> list[Message]:
    """Steps of the rogue's own answer (it may send those to the first stage) and caches whose
    tensors do not fit the model: wrong width, 3 dims, an odd codec, wrong cache heads."""
    kv_heads, head_dim = kv
    bad_hidden = [hidden(1, width + 1), hidden(2, width - 1), hidden(1, width, codec="int8"),
                  wire.encode_tensor(np.ones((1, 1, width), np.float32), "f32", compress=False),
                  hidden(4096, width)]
    out: list[Message] = [wire.Forward(session, seq, term, epoch, 0, payload, tuple(route))
                          for seq, payload in enumerate(bad_hidden)]
    out += [wire.Result(session, 0, payload) for payload in bad_hidden]
    out += [wire.CacheHandover(session, term, epoch, layer, bad, bad)
            for bad in (cache(kv_heads + 1, 3, head_dim), cache(kv_heads, 3, head_dim + 1), cache(1, 1, 1))]
    return out


def oversized_result(session: str, size_bytes: int) -> wire.Result:
    """A `Result` of at least ``size_bytes`` (float32 rows of 64)."""
    rows = -(-size_bytes // (64 * 4))
    values = np.zeros((rows, 64), np.float32)
    return wire.Result(session, 0, wire.encode_tensor(values, "f32", compress=False))


def raw_garbage(message_id: int) -> list[bytes | str]:
    """Pieces no honest link sends: too short for a header, a text piece, random bytes as a
    whole message, a piece of the largest size that is not a message either, and the start of
    a message of 65,535 pieces. (A piece over the frame size does not even leave: the data
    channel refuses it at the sender.)"""
    def header(offset: int, index: int, count: int) -> bytes:
        return (message_id + offset).to_bytes(4, "big") + index.to_bytes(2, "big") + count.to_bytes(2, "big")

    return [
        b"\x00\x01",
        "a text piece",
        header(0, 0, 1) + secrets.token_bytes(64),
        header(1, 0, 1) + bytes(MAX_FRAME_BYTES - FRAME_HEADER_BYTES),
        header(2, 0, 2**16 - 1) + bytes(1024),
    ]
