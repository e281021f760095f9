"""jaxsparse: sparse and efficient sequence models in JAX (Flax NNX, Pallas, meshes)."""

__version__ = "0.1.0"
