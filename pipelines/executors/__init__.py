"""Executors: turn a batch of uint8 images plus sampled `ViewParams` into float views.

reference.py is the torch reference (every op); fused_cpu.py (numba) and fused_cuda.py (Triton)
are fused fast paths; select.py picks, per batch, the fastest one that implements every op.
Executors never draw randomness of their own (fastmem.pipelines.params does): fused_cuda_sampled.py
runs params.sample_view_params' in-kernel twin (bit-identical, tested against it) before
fused_cuda's per-view body, in one program (the device backend on CUDA).
"""
