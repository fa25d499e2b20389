"""Kernels, one module per family: each builds its kernels (or CUDA C) and declares their parameters once, by name."""
