"""Strict JAX for every test, and a private token cache so tests never touch ~/.cache."""

import os
import tempfile

os.environ.setdefault("JAXSPARSE_CACHE", os.path.join(tempfile.gettempdir(), "jaxsparse-test-cache"))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")
