"""Kernels, one module per family; each exposes launchers that take checked arguments."""
