"""Pallas kernels (TPU Mosaic and GPU) with their custom VJPs.

This package depends on JAX only: kernels take arrays and static parameters and return
arrays. The ops in :mod:`jaxsparse.ops` choose between these kernels and XLA references.
"""
