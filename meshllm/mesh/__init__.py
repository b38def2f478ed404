"""The mesh logic of one node, sans-IO: membership, election, plans, stage checks and the
entry sessions' pause, replay and retry policy (design §7, §8).

`MeshCore` is fed link events, messages, timers and the results of compute jobs, each with
`now`; it is drained of messages to send, compute jobs and events, and says when it next
needs `handle_timer`. It reads no clock and does no I/O: `daemon/` drives it. Its work is
split by role behind a port (`meshllm.mesh.port`): transition, coordinator, stage, entry and
status, one module each.
"""

from meshllm.mesh.core import MeshCore, MeshSettings, incompatibility
from meshllm.mesh.events import Event, Logged, Send, SessionEnded, SessionOutput, StatusChanged
from meshllm.mesh.jobs import Compute, Computed, DropSessions, Job, LoadSpan
from meshllm.mesh.stats import StageStats
from meshllm.errors import MeshUnavailable

__all__ = [
    "Compute", "Computed", "DropSessions", "Event", "Job", "LoadSpan", "Logged", "MeshCore",
    "MeshSettings", "MeshUnavailable", "Send", "SessionEnded", "SessionOutput", "StageStats",
    "StatusChanged", "incompatibility",
]
