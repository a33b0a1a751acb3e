"""Executors: turn a batch of uint8 images plus sampled `ViewParams` into float views.

reference.py is the torch reference (every op); fused_cpu.py (numba) and fused_cuda.py (Triton)
are fused fast paths; select.py picks, per batch, the fastest one that implements every op.
Executors never draw randomness (fastmem.pipelines.params does).
"""
