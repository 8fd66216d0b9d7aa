"""Adapter composition: weighted merging with SVD re-compression, LoRAHub, and mixed-batch multi-adapter serving."""
