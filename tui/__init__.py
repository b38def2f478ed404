"""The client side of meshllm: everything that talks to a daemon only through its HTTP API.

- ``tui.client``: the one HTTP + server-sent-events client (no Textual import);
- ``tui.app`` and its views and widgets: the terminal UI (Textual);
- ``tui.bench``: ``meshllm bench`` (the engine in-process, a running mesh, a mesh against one node);
- ``tui.launcher``: a local mesh of N ``meshllm up --loopback`` processes (tests, scripts, bench);
- ``tui.demo``: a stand-in daemon, for the TUI's tests and screenshots.

Nothing here imports ``daemon`` at run time; the ``daemon.cli*`` commands import these lazily, per command.
"""
