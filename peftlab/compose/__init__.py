"""Adapter composition: weighted merging with SVD re-compression, LoRAHub, mixed-batch multi-adapter serving, and the
OpenAI-compatible HTTP server over it (``serving``: the batching engine; ``server``: the FastAPI app, needing the
``serve`` extra)."""
