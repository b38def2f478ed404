"""One node: the composition root, the mesh driver, the worker thread, its configuration."""
