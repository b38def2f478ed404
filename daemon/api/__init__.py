"""The local HTTP API: the OpenAI-compatible chat completions, status, events and the node's control endpoints."""
