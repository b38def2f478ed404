"""The meshllm daemon: one per device. ``node`` (composition, mesh driver, worker), ``api`` (HTTP),
``net`` (links, discovery), the modules they share (``answer``, ``tasks``, ``hostport``,
``tune_request``) and the ``meshllm`` command line (``cli*``)."""
