"""Model code: sources, the weight cache, shards, sampling and the local engine.

This is the only part of meshllm that imports torch and transformers.
"""
