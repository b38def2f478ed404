"""Federated fine-tuning: LoRA adapters trained on each node's own data, averaged over the mesh
(docs/fine-tuning.md). Sans-IO like the rest of ``meshllm``: no sockets, tasks or clocks."""
