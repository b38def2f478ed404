"""meshllm core library: pure logic and model code.

Importing this package pulls in no networking and no UI (aiortc, zeroconf, textual), and no
torch either: the model code lives in :mod:`meshllm.model` and is imported on demand.
"""

__version__ = "0.1.0"
