"""Product-key memory layer (Lample et al. 2019): a very large key-value memory read sparsely."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.linear import Linear
from jaxsparse.ops.checks import is_integer
from jaxsparse.ops.memory import memory_read, product_key_topk
from jaxsparse.parallel import constrain

# Parameters tagged with this optimiser group are trained by their own optimiser (the paper
# trains the values with a separate, larger learning rate; see jaxsparse.train.optim).
MEMORY_VALUES = "memory_values"


class ProductKeyMemory(nnx.Module):
    """``y = Σ_heads Σ_top-k softmax(score) · values[slot]`` over ``n_keys²`` slots.

    Defaults follow the paper's layer (k_dim 256, 4 heads, knn 32, 512² = 262,144 slots, values
    of the model width). The query network is a linear map to ``heads × k_dim``; each head has
    two sub-key tables of ``n_keys × k_dim/2``; values are shared by the heads and tagged
    ``optimizer_group="memory_values"`` (own learning rate, no weight decay).
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, n_keys: int = 512, heads: int = 4,
                 k_dim: int = 256, knn: int = 32, dtype=jnp.float32, param_dtype=jnp.float32):
        for name, value in (("d_model", d_model), ("n_keys", n_keys), ("heads", heads),
                            ("k_dim", k_dim), ("knn", knn)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if k_dim % 2:
            raise ValueError(f"k_dim={k_dim}: must be even (two halves of the product key)")
        if not 1 <= knn <= n_keys:
            raise ValueError(f"knn={knn}: must be in [1, n_keys={n_keys}]")
        # float32 whatever the compute dtype: the top-k picks from the query's scores, and a
        # bfloat16 query flipped 3% of the picks at init (module output 8.7% off float32's,
        # 0.8% with a float32 query); it is a small projection (d_model x heads·k_dim)
        self.query = Linear(d_model, (heads, k_dim), logical_axes=("embed", None, None),
                            rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        bound = 1 / math.sqrt(k_dim // 2)  # the reference init: uniform in ±1/√(half dim)
        shape = (heads, n_keys, k_dim // 2)
        self.subkeys1 = nnx.Param(jax.random.uniform(rngs.params(), shape, param_dtype,
                                                     -bound, bound))
        self.subkeys2 = nnx.Param(jax.random.uniform(rngs.params(), shape, param_dtype,
                                                     -bound, bound))
        values = jax.random.normal(rngs.params(), (n_keys * n_keys, d_model), param_dtype)
        self.values = nnx.Param(values * d_model ** -0.5, logical_axes=(None, "embed"),
                                optimizer_group=MEMORY_VALUES, weight_decay=False)
        self.knn, self.dtype = knn, dtype

    @property
    def slots(self) -> int:
        return self.values.shape[0]

    def lookup(self, x):
        """``(scores, slots)`` of the top-k slots per head for ``x [..., d]``."""
        return product_key_topk(self.query(x), self.subkeys1[...], self.subkeys2[...], self.knn)

    def __call__(self, x: jax.Array) -> jax.Array:
        scores, slots = self.lookup(x)
        # Read from a table whose value dim is whole (FSDP gathers it, as for any layer): with
        # the table split over fsdp and the tokens too, the compiler would build the global
        # [batch·length, d_model] rows and all-reduce them.
        values = constrain(self.values[...], (None, None)).astype(self.dtype)
        return memory_read(scores, slots, values)
