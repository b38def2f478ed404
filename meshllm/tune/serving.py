"""What each node serves after a tune job, and which links must close because of it. Sans-IO.

A finished job's adapter changes the model id of the nodes that take it up (the model id
carries the adapter's digest), and only the nodes that serve the same model id may form one
mesh: a chain of stages that mix the adapted and the base model answers neither. A new link
is refused by the signaling handshake (`meshllm.mesh.settings.incompatibility`); a link that
is already up is handled here:

- a node that takes up an adapter (`TuneFinished.serve`) is *switching* until the driver has
  loaded it (`served`). Then it announces its new ``Hello`` to every linked peer, on the tune
  channel, so after every part of the final adapter it forwarded;
- a node that hears a peer announce another model id (or another mesh) closes that link with
  a ``Bye``, unless it is switching itself: it decides once its own switch is done (the
  coordinator announces after the final adapter's parts, so a participant is always
  switching by the time its coordinator's announcement arrives);
- a ``Hello`` that claims another node id is ignored.

The nodes that serve one model id stay linked; the others link again only with nodes of their
own model id, and each group elects its coordinator and plans on its own.
"""

from __future__ import annotations

from meshllm import wire
from meshllm.mesh.settings import incompatibility
from meshllm.tune.interface import TuneContext
from meshllm.wire import messages as wm


class Serving:
    """This node's served model, its peers' announcements, and the links to close."""

    def __init__(self, ctx: TuneContext) -> None:
        self.ctx = ctx
        self.own: wire.Hello | None = None
        """What this node serves, as last told (`served`, `announced`)."""
        self.switching: str | None = None
        """The job whose adapter this node is taking up now, if any."""
        self.heard: dict[str, wire.Hello] = {}
        """The last announcement of each linked peer."""

    def switch(self, job_id: str) -> None:
        """This node takes up the adapter of ``job_id``: decide on announcements afterwards."""
        self.switching = job_id

    def served(self, hello: wire.Hello) -> None:
        """The driver loaded the adapter (or failed to): this node serves ``hello.model_id``.
        Announce it to every linked peer, and close the links to peers that announced another."""
        self.own = hello
        self.switching = None
        for peer in sorted(self.ctx.members):
            self.ctx.out.send(peer, hello)
        for peer in sorted(self.heard):
            self._check(peer)

    def announced(self, sender: str, hello: wire.Hello, own: wire.Hello) -> None:
        """``sender`` serves ``hello.model_id`` now; ``own`` is what this node serves."""
        if hello.node_id != sender:
            self.ctx.out.log("error", f"ignored a Hello from {sender}: it names {hello.node_id}")
            return
        if self.switching is None:
            self.own = own
        self.heard[sender] = hello
        if self.switching is None:
            self._check(sender)

    def membership(self) -> None:
        """Forget the announcements of peers no longer linked (a new link is checked anew)."""
        for peer in sorted(set(self.heard) - set(self.ctx.members)):
            del self.heard[peer]

    def _check(self, peer: str) -> None:
        own, theirs = self.own, self.heard.get(peer)
        if own is None or theirs is None or peer not in self.ctx.members:
            return
        reason = incompatibility(own, theirs)
        if reason is None:
            return
        del self.heard[peer]
        text = f"{self.ctx.node_id} and {peer} serve different models now: {reason}"
        self.ctx.out.log("info", f"closing the link to {peer}: {reason} (after a tune job's adapter)")
        self.ctx.out.send(peer, wire.Bye(self.ctx.node_id, text[: wm.MAX_REASON_CHARS]))
