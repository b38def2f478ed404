"""Mesh cores wired together in memory, with a fake clock and a toy model: the mesh logic
without torch, sockets or an event loop (like the election tests' `Net`).

The toy model has real KV-cache rules: a layer's output at a position depends on every
earlier position's input to that layer, so a cache that is missing, stale or built in the
wrong order changes the tokens. Every message is encoded and decoded on the way.

Below the simulator: the scenarios the role tests share (`settled`, `kill_when`, ...), and a
port stub (`PortStub`) for testing one role of the core on its own.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from meshllm import wire
from meshllm.placement.linkstats import LinkStats
from meshllm.mesh import (
    Compute, Computed, DropSessions, Job, LoadSpan, Logged, MeshCore, MeshSettings, SessionEnded, SessionOutput,
    StageStats, StatusChanged,
)
from meshllm.mesh.core import ModelLimits
from meshllm.mesh.jobs import ImportCache, Loaded, RebuildPart
from meshllm.mesh.plans import PlanBook
from meshllm.mesh.rebuild import OutputLogs, Rebuilder
from meshllm.placement.planner import ModelSpec
from meshllm.mesh.session import Session, StateChange, Token

HIDDEN = 8
VOCAB = 50
LAYERS = 6
LAYER_BYTES = 1000
EMBED_HEAD_BYTES = 500
SPEC = ModelSpec(LAYERS, LAYER_BYTES, EMBED_HEAD_BYTES)
LIMITS = ModelLimits(HIDDEN, 4096)
EOS = 0


def embed(token_ids: tuple[int, ...]) -> np.ndarray:
    rows = np.zeros((len(token_ids), HIDDEN), dtype=np.float32)
    for i, t in enumerate(token_ids):
        rows[i] = np.sin(np.arange(HIDDEN, dtype=np.float32) * (t + 1))
    return rows


def layer(index: int, x: np.ndarray, past: np.ndarray) -> np.ndarray:
    """Position p's output depends on inputs 0..p of this layer (causal attention, in toy)."""
    out = np.empty_like(x)
    history = list(past)
    for p in range(x.shape[0]):
        history.append(x[p])
        context = np.mean(history, axis=0)
        out[p] = np.tanh(x[p] + 0.5 * context * (index + 1) + 0.1 * index)
    return out


def sample(hidden: np.ndarray) -> int:
    """Greedy, in toy: a token from the last position's state."""
    return int(abs(float(hidden[-1].sum())) * 1000) % (VOCAB - 1) + 1  # never EOS


class ToyShard:
    """One node's layers and its KV caches, with the shard's step rules; it keeps the
    caches of the layers it still holds across re-plans, and an output log (as the runtime)."""

    batch_invariant = False
    """The toy's layers give a position the same bits in any chunk (`np.mean` over the same
    rows); this flag only says whether a rebuild may rely on it (LayerStore)."""

    def __init__(self) -> None:
        self.span = (0, 0)
        self.caches: dict[str, list[list[np.ndarray]]] = {}
        self.layer_runs: list[tuple[str, int, int, int, int]] = []
        """Every `run_layers` call: (session, start_pos, positions, lo, hi)."""
        self.rebuild_runs: list[tuple[str, int, int, int, int]] = []
        """The `run_layers` calls a rebuild made, likewise."""
        self.logs = OutputLogs()
        self.pending_imports: list[ImportCache] = []
        self.rebuilder = Rebuilder(self, self.logs, LAYERS, self._offers)

    def load(self, start: int, end: int) -> Loaded:
        old_start, old_end = self.span
        given = tuple((sid, i, np.array(layers[i - old_start]).reshape(1, -1, HIDDEN),
                       np.array(layers[i - old_start]).reshape(1, -1, HIDDEN))
                      for sid, layers in self.caches.items() for i in range(old_start, old_end)
                      if not start <= i < end and layers[i - old_start])
        for sid, layers in list(self.caches.items()):
            self.caches[sid] = [layers[i - old_start] if old_start <= i < old_end else [] for i in range(start, end)]
        self.span = (start, end)
        if start == end:
            self.caches = {}
            self.logs = OutputLogs(self.logs.cap_bytes)
            self.rebuilder = Rebuilder(self, self.logs, LAYERS, self._offers)
        self.given = given
        return Loaded(given)

    def import_cache(self, job: ImportCache) -> None:
        self.pending_imports.append(job)

    def _offers(self, session_id: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
        mine = [(j.layer, j.keys, j.values) for j in self.pending_imports if j.session_id == session_id]
        mine += [(layer, k, v) for sid, layer, k, v in getattr(self, "given", ()) if sid == session_id]
        self.pending_imports = [j for j in self.pending_imports if j.session_id != session_id]
        return mine

    def install_layer(self, session_id: str, layer: int, keys: np.ndarray, values: np.ndarray) -> bool:
        start, end = self.span
        if not start <= layer < end:
            return False
        cache = self.caches.setdefault(session_id, [[] for _ in range(end - start)])
        if cache[layer - start]:
            return False
        cache[layer - start] = list(keys[0])
        return True

    def drop(self, session_id: str) -> None:
        self.caches.pop(session_id, None)
        self.logs.forget(session_id)
        self.rebuilder.forget(session_id)

    # LayerStore
    def layer_lengths(self, session_id: str) -> list[int]:
        cache = self.caches.get(session_id)
        return [len(c) for c in cache] if cache else [0] * (self.span[1] - self.span[0])

    def keep_layers(self, session_id: str, lo: int, hi: int, positions: int) -> None:
        cache = self.caches.setdefault(session_id, [[] for _ in range(self.span[1] - self.span[0])])
        for i in range(len(cache)):
            cache[i] = cache[i][:positions] if lo <= i < hi else []

    def run_layers(self, session_id: str, x: np.ndarray, start_pos: int, lo: int, hi: int) -> np.ndarray:
        self.layer_runs.append((session_id, start_pos, x.shape[0], lo, hi))
        cache = self.caches[session_id]
        for i in range(lo, hi):
            if len(cache[i]) != start_pos:
                raise ValueError(f"KV cache holds {len(cache[i])} positions, step starts at {start_pos}")
            past = np.array(cache[i]).reshape(-1, HIDDEN)
            cache[i].extend(x)
            x = layer(self.span[0] + i, x, past)
        return x

    def forward(self, session_id: str, x: np.ndarray, start_pos: int) -> np.ndarray:
        start, end = self.span
        if start_pos == 0 or session_id not in self.caches:
            if start_pos != 0:
                raise ValueError(f"session {session_id} has no KV cache here")
            self.caches[session_id] = [[] for _ in range(end - start)]
        return self.run_layers(session_id, x, start_pos, 0, end - start)

    def run(self, job: Compute | RebuildPart) -> Computed:
        x = embed(job.token_ids) if job.token_ids is not None else job.hidden
        if isinstance(job, RebuildPart):
            before = len(self.layer_runs)
            out, report, error = self.rebuilder.run(job, x)
            self.rebuild_runs += self.layer_runs[before:]
            return Computed(hidden=out, rebuild=report, rebuild_error=error)
        assert x is not None
        if job.run_span:
            x = self.forward(job.session_id, x, job.start_pos)
        if job.finish == "sample":
            return Computed(token_id=sample(x), span_ms=1.0)
        if job.finish == "discard":
            return Computed(span_ms=1.0)
        if job.run_span and self.span[1] < LAYERS:
            self.logs.record(job.session_id, self.span[1], job.start_pos, x)
        return Computed(hidden=x, span_ms=1.0)


def reference(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """The answer one node holding every layer gives, without any mesh."""
    shard = ToyShard()
    shard.load(0, LAYERS)
    tokens: list[int] = []
    feed, pos = prompt, 0
    while len(tokens) < max_tokens:
        x = shard.forward("ref", embed(feed), pos)
        pos += len(feed)
        tokens.append(sample(x))
        feed = (tokens[-1],)
    return tokens


@dataclass
class Answer:
    tokens: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    finish_reason: str | None = None


@dataclass
class SimNode:
    core: MeshCore
    ms_per_layer: float
    shard: ToyShard = field(default_factory=ToyShard)
    queue: deque[Job] = field(default_factory=deque)
    busy_until: float = 0.0
    running: tuple[float, Job] | None = None
    answers: dict[str, Answer] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)
    jobs_run: list[Job] = field(default_factory=list)
    sent: list[wire.Message] = field(default_factory=list)
    slow_factor: float = 1.0
    frozen: bool = False
    """A hung node: its jobs never run."""


class Net:
    """Nodes, links between them, messages in flight, and a fake clock."""

    def __init__(self, latency_s: float = 0.001) -> None:
        self.now = 0.0
        self.latency_s = latency_s
        self.nodes: dict[str, SimNode] = {}
        self.links: set[frozenset[str]] = set()
        self.in_flight: list[tuple[float, int, str, str, bytes]] = []
        self._seq = 0
        self.lose: Callable[[str, str, wire.Message], bool] = lambda sender, dest, msg: False
        """Which messages the network loses (sender, destination, message)."""
        self.extra_latency_s: Callable[[str, str, wire.Message], float] = lambda sender, dest, msg: 0.0
        """A further delay for some messages (a link with a backlog)."""

    def add(self, node_id: str, *, mem_budget_bytes: int = 10**6, ms_per_layer: float = 1.0,
            settings: MeshSettings | None = None, can_coordinate: bool = True) -> SimNode:
        hello = wire.Hello(node_id, node_id, wire.PROTOCOL_VERSION, "sim", "toy-model", 8000,
                           mem_budget_bytes, ms_per_layer, can_coordinate)
        core = MeshCore(hello, SPEC, LIMITS, settings or MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0))
        node = SimNode(core, ms_per_layer)
        node.shard.batch_invariant = core.settings.batch_invariant  # as the daemon's runtime tells its core
        self.nodes[node_id] = node
        core.start(self.now)
        self._collect(node_id)
        return node

    # -- topology --------------------------------------------------------------------------

    def connect(self, a: str, b: str) -> None:
        self.links.add(frozenset((a, b)))
        self.nodes[a].core.link_up(b, self.nodes[b].core.hello, self.now)
        self.nodes[b].core.link_up(a, self.nodes[a].core.hello, self.now)
        self._collect(a)
        self._collect(b)

    def disconnect(self, a: str, b: str) -> None:
        self.links.discard(frozenset((a, b)))
        for x, y in ((a, b), (b, a)):
            if x in self.nodes:
                self.nodes[x].core.link_down(y, "heartbeat timeout", self.now)
                self._collect(x)

    def connect_all(self) -> None:
        ids = sorted(self.nodes)
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                self.connect(a, b)

    def kill(self, node_id: str) -> None:
        """The node vanishes: every peer sees its link go down."""
        for link in [link for link in self.links if node_id in link]:
            (peer,) = link - {node_id}
            self.disconnect(node_id, peer)
        del self.nodes[node_id]

    def partition(self, *groups: set[str]) -> None:
        for link in list(self.links):
            a, b = sorted(link)
            if not any(a in g and b in g for g in groups):
                self.disconnect(a, b)

    def measure_links(self, stats: Callable[[str, str], LinkStats | None]) -> None:
        """Every node's links measured once (as its driver does about once a second):
        ``stats(node, peer)`` is what ``node`` measured on its link to ``peer``."""
        for node_id, node in list(self.nodes.items()):
            peers = [peer for link in self.links if node_id in link for peer in link if peer != node_id]
            node.core.links_measured({peer: stats(node_id, peer) for peer in sorted(peers)}, self.now)
            self._collect(node_id)

    def run_measuring(self, seconds: float, stats: Callable[[str, str], LinkStats | None],
                      every_s: float = 1.0) -> None:
        """Run for ``seconds``, measuring the links every ``every_s``."""
        end = self.now + seconds
        while self.now < end:
            self.measure_links(stats)
            self.run_for(min(every_s, end - self.now))

    # -- answers ---------------------------------------------------------------------------------

    def ask(self, node_id: str, prompt: tuple[int, ...], max_tokens: int) -> Answer:
        session = Session("", prompt, max_tokens, frozenset({EOS}))
        node = self.nodes[node_id]
        answer = Answer()
        # the core emits the first outputs inside open_session: register before collecting
        sid = node.core.open_session(session, self.now)
        node.answers[sid] = answer
        self._collect(node_id)
        return answer

    # -- running -----------------------------------------------------------------------------------

    def step(self) -> bool:
        """Deliver what is due and finish the jobs that are due; False when nothing was."""
        progressed = False
        while self.in_flight and self.in_flight[0][0] <= self.now:
            _, _, sender, dest, data = heapq.heappop(self.in_flight)
            if dest in self.nodes and frozenset((sender, dest)) in self.links:
                self.nodes[dest].core.receive(sender, wire.decode(data), self.now)
                self._collect(dest)
            progressed = True
        for node_id, node in list(self.nodes.items()):
            if node_id not in self.nodes:
                continue
            if node.running is not None and node.running[0] <= self.now:
                job = node.running[1]
                node.running = None
                self._finish(node_id, node, job)
                progressed = True
            if node.running is None and node.queue and not node.frozen:
                job = node.queue.popleft()
                node.running = (self.now + self._cost(node, job), job)
                progressed = True
        for node_id, node in list(self.nodes.items()):
            timer = node.core.next_timer()
            if timer is not None and timer <= self.now:
                node.core.handle_timer(self.now)
                self._collect(node_id)
                progressed = True
        return progressed

    def next_time(self) -> float | None:
        times = [self.in_flight[0][0]] if self.in_flight else []
        for node in self.nodes.values():
            if node.running is not None:
                times.append(node.running[0])
            timer = node.core.next_timer()
            if timer is not None:
                times.append(timer)
        return min(times, default=None)

    def run_until(self, done, max_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
        """Step until `done()`; the fake clock jumps to the next thing due."""
        deadline = self.now + max_s
        while not done():
            if self.step():
                continue
            nxt = self.next_time()
            if nxt is None or nxt > deadline:
                raise AssertionError(f"stuck at t={self.now:.3f}: nothing left to do and not done")
            self.now = max(self.now, nxt)

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        self.run_until(lambda: self.now >= end and self.next_time_is_after(end), max_s=seconds + 1)

    def next_time_is_after(self, t: float) -> bool:
        nxt = self.next_time()
        return nxt is None or nxt > t

    def answer(self, node_id: str, prompt: tuple[int, ...], max_tokens: int, max_s: float = 60.0) -> Answer:
        answer = self.ask(node_id, prompt, max_tokens)
        self.run_until(lambda: answer.done, max_s)
        return answer

    def settle(self, max_s: float = 30.0) -> None:
        """Until every node has the same active plan."""
        self.run_until(self.one_active_plan, max_s)

    def one_active_plan(self) -> bool:
        keys = {n.core.book.active.key if n.core.book.active else None for n in self.nodes.values()}
        return None not in keys and len(keys) == 1

    # -- internals ---------------------------------------------------------------------------------

    def _cost(self, node: SimNode, job: Job) -> float:
        if isinstance(job, RebuildPart) and job.run_span:
            start, end = node.shard.span
            return (end - start) * node.ms_per_layer * node.slow_factor * job.positions / 4000
        if isinstance(job, Compute) and job.run_span:
            start, end = node.shard.span
            return (end - start) * node.ms_per_layer * node.slow_factor / 1000
        return 0.0

    def _finish(self, node_id: str, node: SimNode, job: Job) -> None:
        node.jobs_run.append(job)
        if isinstance(job, LoadSpan):
            node.core.job_done(job.job_id, node.shard.load(job.start_layer, job.end_layer), self.now)  # type: ignore[arg-type]
        elif isinstance(job, ImportCache):
            node.shard.import_cache(job)
            node.core.job_done(job.job_id, None, self.now)
        elif isinstance(job, DropSessions):
            for sid in job.session_ids:
                node.shard.drop(sid)
            node.core.job_done(job.job_id, None, self.now)
        else:
            try:
                result = node.shard.run(job)
            except (ValueError, RuntimeError) as e:
                node.core.job_failed(job.job_id, str(e), self.now)
            else:
                start, end = node.shard.span
                ms = (end - start) * node.ms_per_layer * node.slow_factor if job.run_span else 0.0
                node.core.job_done(job.job_id, dataclasses.replace(result, span_ms=ms), self.now)
        self._collect(node_id)

    def _collect(self, node_id: str) -> None:
        node = self.nodes[node_id]
        core = node.core
        for send in core.sends():
            node.sent.append(send.message)
            if self.lose(node_id, send.dest, send.message):
                continue
            due = self.now + self.latency_s + self.extra_latency_s(node_id, send.dest, send.message)
            self._seq += 1
            heapq.heappush(self.in_flight, (due, self._seq, node_id, send.dest, wire.encode(send.message)))
        node.queue.extend(core.jobs())
        for event in core.events():
            if isinstance(event, Logged):
                node.log.append(event)
            elif isinstance(event, SessionOutput):
                answer = node.answers.setdefault(event.session_id, Answer())
                if isinstance(event.item, Token):
                    if event.item.id >= 0:
                        answer.tokens.append(event.item.id)
                    answer.finish_reason = event.item.finish_reason
                elif isinstance(event.item, StateChange):
                    answer.states.append(event.item.state)
            elif isinstance(event, SessionEnded):
                answer = node.answers.setdefault(event.session_id, Answer())
                answer.done, answer.error = True, event.error


# -- scenarios the role tests share ----------------------------------------------------------------

PROMPT = (5, 6, 7, 8, 9)
OTHER_PROMPT = (11, 3, 42)


def settled(names: str = "abc", **settings: object) -> Net:
    """Nodes linked to each other, with one active plan; `settings` override MeshSettings."""
    net = Net()
    for n in names:
        net.add(n, settings=MeshSettings(**{"election_timeout_s": 0.2, "plan_wait_s": 10.0, **settings}))  # type: ignore[arg-type]
    net.connect_all()
    net.settle()
    return net


NEED_BYTES = LAYERS * LAYER_BYTES + EMBED_HEAD_BYTES
"""What one node needs to hold the whole toy model."""


def short_of_memory() -> Net:
    """Nodes a and b with a third of the model's bytes each, linked: the coordinator cannot
    place the model, and every node has heard so."""
    net = Net()
    for n in "ab":
        net.add(n, mem_budget_bytes=NEED_BYTES // 3)
    net.connect_all()
    net.run_until(lambda: all(n.core.placement_error for n in net.nodes.values()))
    return net


def three_nodes() -> Net:
    return settled("abc")


def kill_when(net: Net, answer_node: str, victim_of: Callable[[Net], str], tokens: int,
              max_tokens: int = 40) -> tuple[Answer, str]:
    """Ask at `answer_node`; once `tokens` came, kill `victim_of(net)`; run to the end."""
    answer = net.ask(answer_node, PROMPT, max_tokens)
    net.run_until(lambda: len(answer.tokens) >= tokens)
    victim = victim_of(net)
    net.kill(victim)
    net.run_until(lambda: answer.done)
    return answer, victim


def lose_one_step(net: Net, after_seq: int = -1) -> list[wire.Message]:
    """The network loses the first step output that the last stage other than node a sends
    after step `after_seq`; the list holds it once lost."""
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    last = plan.node_ids[-1] if plan.node_ids[-1] != "a" else plan.node_ids[-2]
    dropped: list[wire.Message] = []

    def lose(sender: str, dest: str, msg: wire.Message) -> bool:
        if sender == last and not dropped and isinstance(msg, (wire.Result, wire.Forward)) and msg.seq > after_seq:
            dropped.append(msg)
            return True
        return False

    net.lose = lose
    return dropped


def forward(net: Net, sender: str, target: str, *, hidden: np.ndarray, session: str | None = None,
            route: tuple[str, ...] | None = None) -> None:
    """A `Forward` from `sender` straight into `target`'s core (not collected)."""
    plan = net.nodes[target].core.book.active
    assert plan is not None
    msg = wire.Forward(session or f"{sender}/99", 0, plan.key[0], plan.key[1], 0,
                       wire.encode_tensor(hidden, "f32"), route or (sender,))
    net.nodes[target].core.receive(sender, msg, net.now)


def rebuild_logs(net: Net) -> list[str]:
    return [e.message for n in net.nodes.values() for e in n.log if e.message.startswith("rebuilt session")]


SLOW_LINK_MS = 30.0


def slow_links(slow: str) -> Callable[[str, str], LinkStats]:
    """Loopback-like links, except that every link of ``slow`` has SLOW_LINK_MS more round trip
    (what its peers and itself measure when it runs with --debug-link-delay-ms)."""
    def stats(node: str, peer: str) -> LinkStats:
        rtt = 1.0 + (SLOW_LINK_MS if slow in (node, peer) else 0.0)
        return LinkStats(rtt_ms=rtt, small_mb_s=20.0, large_mb_s=40.0, samples=2, rtt_samples=16)
    return stats


def placed(target_ms_per_token: float | None) -> Net:
    """Three nodes that can each hold 4 of the 6 layers (so at least two are needed); a's links
    are slow, as the sim delivers them and as the links measure them. Before the first
    measurement every pair looks alike, and the plan takes a."""
    net = Net()
    settings = MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, target_ms_per_token=target_ms_per_token)
    for n in "abc":
        net.add(n, mem_budget_bytes=EMBED_HEAD_BYTES + 4 * LAYER_BYTES, settings=settings)
    net.extra_latency_s = lambda sender, dest, msg: SLOW_LINK_MS / 2000 if "a" in (sender, dest) else 0.0
    net.connect_all()
    net.settle()
    plan = net.nodes["b"].core.book.active
    assert plan is not None and "a" in plan.node_ids
    net.run_measuring(3.0, slow_links("a"))
    net.settle()
    return net


# -- a port for one role alone ---------------------------------------------------------------------


class PortStub:
    """The port (`meshllm.mesh.port.Port`) for one role on its own: it records what the role
    sends, runs, emits and logs, and its views are plain fields a test sets."""

    def __init__(self, node_id: str = "a", members: tuple[str, ...] = ("a", "b", "c"),
                 settings: MeshSettings | None = None) -> None:
        self.node_id = node_id
        self.settings = settings or MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0)
        self.spec = SPEC
        self.limits = LIMITS
        self.stats = StageStats()
        self.now = 0.0
        self.members: dict[str, wire.Hello] = {
            n: wire.Hello(n, n, wire.PROTOCOL_VERSION, "sim", "toy-model", 8000, 10**6, 1.0, True) for n in members}
        self.term = 1
        self.coordinator_id: str | None = node_id
        self.plans: PlanBook = PlanBook()
        self.span = (0, 0)
        self.placement_error: str | None = None
        self.sent: list[tuple[str, wire.Message]] = []
        self.jobs: list[Job] = []
        self.events: list[object] = []
        self._job_ids = 0

    @property
    def is_coordinator(self) -> bool:
        return self.coordinator_id == self.node_id

    def name_of(self, node_id: str) -> str:
        return node_id

    def send(self, dest: str, msg: wire.Message, *, channel: str = "control", positions: int = 0) -> None:
        self.sent.append((dest, msg))

    def add_job(self, job: Job) -> None:
        self.jobs.append(job)

    def emit(self, event: object) -> None:
        self.events.append(event)

    def log(self, kind: str, message: str) -> None:
        self.events.append(Logged(kind, message))  # type: ignore[arg-type]

    def changed(self) -> None:
        self.events.append(StatusChanged())

    def next_job_id(self) -> int:
        self._job_ids += 1
        return self._job_ids

    def drain(self) -> tuple[list[tuple[str, wire.Message]], list[Job], list[object]]:
        out = (self.sent, self.jobs, self.events)
        self.sent, self.jobs, self.events = [], [], []
        return out