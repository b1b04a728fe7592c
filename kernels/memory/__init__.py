"""Memory read and update: Triton kernels (fused_chunk.py) beside their PyTorch reference (naive.py)."""
