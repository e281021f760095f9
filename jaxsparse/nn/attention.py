"""Grouped-query self-attention with rotary positions and a key/value decode cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.batch_local import heads_local
from jaxsparse.nn.cache_layout import stored, viewed
from jaxsparse.nn.linear import Linear
from jaxsparse.ops.attention import (dot_product_attention, full_cache_decode,
                                     window_cache_decode)
from jaxsparse.ops.attention.api import IMPLEMENTATIONS, lazy_mask
from jaxsparse.ops.attention.decode import reads_written_part
from jaxsparse.ops.checks import check_cache_request
from jaxsparse.ops.masks import CausalMask, Mask, made_causal
from jaxsparse.ops.rotary import apply_rotary, check_rope_theta, check_rotary_head_dim
from jaxsparse.ops.attention.ring import ring_attention
from jaxsparse.parallel import constrain, current_mesh, sequence_axis_size


class Attention(nnx.Module):
    """Causal multi-head attention; ``n_heads % n_kv_heads == 0`` gives MHA, GQA or MQA.
    ``mask`` (a Mask, a spec string or None) restricts it further (``ops.masks.made_causal``).

    Decode-cache protocol (shared by every sequence mixer, attention or recurrent):
    ``init_cache(batch, max_len, dtype)`` returns a pytree, and calling the layer with
    ``cache=`` and ``cache_index=`` (number of positions already in the cache) returns the
    output and the updated cache.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 rngs: nnx.Rngs, rope_theta: float = 10_000.0, out_init_scale: float = 1.0,
                 mask: Mask | str = CausalMask(), implementation: str | None = None,
                 dtype=jnp.float32, param_dtype=jnp.float32, linear=Linear):
        # ``linear``: the projections' class (``Linear``'s constructor), e.g. MonarchLinear.
        if min(d_model, n_heads, n_kv_heads, head_dim) < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads}, n_kv_heads={n_kv_heads}, head_dim={head_dim}, "
                             f"d_model={d_model}: each must be >= 1, and n_heads a multiple of "
                             "n_kv_heads")
        check_rope_theta(rope_theta, "rope_theta")
        check_rotary_head_dim(head_dim)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r} is not available; allowed: "
                             f"{IMPLEMENTATIONS}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = linear(d_model, (n_heads, head_dim), logical_axes=("embed", "heads", "kv"), **kw)
        self.k_proj = linear(d_model, (n_kv_heads, head_dim),
                             logical_axes=("embed", "kv_heads", "kv"), **kw)
        self.v_proj = linear(d_model, (n_kv_heads, head_dim),
                             logical_axes=("embed", "kv_heads", "kv"), **kw)
        self.o_proj = linear((n_heads, head_dim), d_model, logical_axes=("heads", "kv", "embed"),
                             init_scale=out_init_scale, **kw)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.implementation = implementation
        # lazy and hashable: a static part of the module (a spec string such as "local:256"
        # is parsed once here, so per-head masks are recognised as such below)
        self.mask = made_causal(lazy_mask(mask, n_heads))
        # a mask that reads at most this many recent positions decodes from a ring buffer of
        # that many slots (ops.attention.window_cache_decode) instead of a cache of max_len
        self.cache_window = self.mask.lookback()

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, jax.Array]:
        check_cache_request(batch, max_len, dtype)  # an integer cache would truncate keys
        # heads first: a decode step reads each head's slots contiguously (decode_attention)
        slots = max_len if self.cache_window is None else min(max_len, self.cache_window)
        shape = (batch, self.n_kv_heads, slots, self.head_dim)
        return {"k": self._keep(jnp.zeros(shape, dtype)), "v": self._keep(jnp.zeros(shape, dtype))}

    def _keep(self, cache):
        """The cache as kept between steps: without a size-1 batch axis (nn.cache_layout),
        except with one key/value head, where the dense reference reads the cache sequence
        first and the 4-d cache decoded faster (bench decode: squeezed 0.75-0.89x), and
        except a cache that decode_attention reads only as far as it is written: its read sits
        in a lax.cond, where XLA:CPU no longer copies the 4-d cache, and the squeezed one was
        copied into the cond's branches (transformer_small, batch 1, 4096 slots, 256 written:
        1.7 ms a token kept 4-d, about 20 squeezed; 4.7 squeezed reading every slot)."""
        slots = cache.shape[2]
        if self.n_kv_heads == 1 or (slots != self.cache_window and reads_written_part(slots)):
            return cache
        return stored(cache)

    def __call__(self, x_BLD, positions_BL, *, segment_ids=None, cache=None, cache_index=None):
        q = apply_rotary(self.q_proj(x_BLD), positions_BL, self.rope_theta)
        k = apply_rotary(self.k_proj(x_BLD), positions_BL, self.rope_theta)
        v = self.v_proj(x_BLD)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        shards = sequence_axis_size()
        if cache is None and shards > 1 and x_BLD.shape[1] % shards == 0:
            # context parallelism: the length is split over the mesh's sequence axis, so K/V
            # blocks travel around the ring instead of being gathered on every device
            out = ring_attention(q, k, v, mesh=current_mesh(), mask=self.mask,
                                 segment_ids=segment_ids)
            new_cache = None
        elif cache is None:
            # each device attends its rows and heads (GQA groups stay whole: a query head's
            # key/value head is on the same device when both head counts split evenly)
            def attend(q, k, v, *segments):
                return dot_product_attention(q, k, v, mask=self.mask,
                                             segment_ids=segments[0] if segments else None,
                                             implementation=self.implementation)

            per_head_mask = getattr(self.mask, "num_heads", None) is not None
            segments = () if segment_ids is None else (segment_ids,)
            out = heads_local(attend, (q, k, v), segments, split_heads=not per_head_mask)
            new_cache = None
        else:
            if not isinstance(cache, dict) or not {"k", "v"} <= set(cache):  # (a bare KeyError)
                found = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
                raise ValueError(f"cache: expected the dict init_cache gives, with ['k', 'v']; "
                                 f"got {found}")
            k_cache, v_cache = (viewed(cache[name], x_BLD.shape[0], self.n_kv_heads, None,
                                       self.head_dim, name=f"cache[{name!r}]")
                                for name in ("k", "v"))
            if k_cache.shape[2] == self.cache_window:
                out, k_all, v_all = window_cache_decode(q, k, v, k_cache, v_cache, cache_index,
                                                        mask=self.mask)
            else:
                out, k_all, v_all = full_cache_decode(q, k, v, k_cache, v_cache, cache_index,
                                                      mask=self.mask)
            new_cache = {"k": self._keep(k_all), "v": self._keep(v_all)}
        return self.o_proj(out), new_cache
