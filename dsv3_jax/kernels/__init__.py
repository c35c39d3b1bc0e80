"""Pallas kernels, each beside its pure-JAX reference (placeholder until the kernels land)."""
