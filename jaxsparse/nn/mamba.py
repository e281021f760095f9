"""Mamba-1 and Mamba-2 mixer blocks (Gu & Dao 2023; Dao & Gu 2024).

Parameterisation and initialisation follow the papers and state-spaces/mamba: A = -exp(A_log)
with S4D-real ``A_log = log(1..N)`` (Mamba-1) or ``-A ~ U(1, 16)`` per head (Mamba-2); D = 1;
dt initialised log-uniform in [1e-3, 0.1] (floored at 1e-4) through an inverse-softplus
bias; A_log, D and the dt bias carry ``weight_decay=False``. Both blocks follow the decode
cache protocol of :class:`jaxsparse.nn.Attention` (``init_cache``; ``cache=``/``cache_index=``).
With ``segment_ids`` and a cache (a chunked prefill of packed documents) the carried
convolution and scan states belong to the chunk's first document: cut chunks inside
documents (the ids of one chunk cannot say that its first token starts a new one).

Precision: projections, the convolution and the gate norm hold ``param_dtype`` weights and
compute in ``dtype`` (bfloat16 on accelerators); the recurrence's own parameters (A_log, D,
the dt bias) stay float32 whatever ``param_dtype`` says, as state-spaces/mamba keeps A_log
and D in fp32. They are O(1) numbers (A_log = log 1..N, D = 1, bias ≈ −7..−2), where
bfloat16's spacing is 2⁻⁷..2⁻⁵: an optimiser step of lr ≈ 1e-3 would round away and they
would never train. The scans accumulate their state in float32 (:mod:`jaxsparse.ops.ssm`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn.linear import Linear
from jaxsparse.ops.checks import check_cache_batch, check_cache_request, is_integer
from jaxsparse.ops.conv import causal_depthwise_conv1d
from jaxsparse.ops.native.selective_scan import available as native_scan_available
from jaxsparse.ops.normalization import rms_norm
from jaxsparse.ops.ssm import (SCAN_IMPLEMENTATIONS, selective_scan,
                               selective_scan_sequence_parallel, ssd, ssd_native, ssd_reference,
                               ssd_sequence_parallel)
from jaxsparse.parallel import current_mesh, sequence_axis_size


def _check_sizes(**sizes: int) -> None:
    bad = {name: size for name, size in sizes.items()
           if not is_integer(size) or size < 1}
    if bad:
        raise ValueError(", ".join(f"{name}={size!r}" for name, size in bad.items())
                         + ": each must be an integer >= 1")


def _check_input(x_BLD) -> None:
    if x_BLD.ndim != 3:  # its width is checked by the in-projection
        raise ValueError(f"x must be [batch, length, d_model]; got {x_BLD.shape}")


def _dt_bias(rng, size, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """Bias whose softplus is log-uniform in [dt_min, dt_max]: dt + log(-expm1(-dt))."""
    u = jax.random.uniform(rng, (size,))
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def _conv_params(rngs, width, channels, param_dtype):
    bound = 1.0 / math.sqrt(width)  # PyTorch Conv1d default: fan_in = width for depthwise
    w = jax.random.uniform(rngs.params(), (width, channels), param_dtype, -bound, bound)
    b = jax.random.uniform(rngs.params(), (channels,), param_dtype, -bound, bound)
    return (nnx.Param(w, logical_axes=("conv", "mlp")),
            nnx.Param(b, logical_axes=("mlp",), weight_decay=False))


class Mamba(nnx.Module):
    """Mamba-1 block: in-projection to (x, z), causal conv + SiLU on x, selective scan with
    input-dependent dt, B, C, gate by SiLU(z), out-projection."""

    def __init__(self, d_model: int, *, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None, rngs: nnx.Rngs, out_init_scale: float = 1.0,
                 implementation: str | None = None, chunk_size: int = 64,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        _check_sizes(d_model=d_model, d_state=d_state, expand=expand, d_conv=d_conv,
                     dt_rank=1 if dt_rank is None else dt_rank, chunk_size=chunk_size)
        if implementation not in SCAN_IMPLEMENTATIONS:  # at build, not at the first call
            raise ValueError(f"implementation={implementation!r}: allowed {SCAN_IMPLEMENTATIONS}")
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear(d_model, 2 * d_inner, logical_axes=("embed", "mlp"), **kw)
        self.conv_w, self.conv_b = _conv_params(rngs, d_conv, d_inner, param_dtype)
        self.x_proj = Linear(d_inner, self.dt_rank + 2 * d_state, logical_axes=("mlp", None),
                             **kw)
        bound = self.dt_rank ** -0.5
        self.dt_proj = nnx.Param(jax.random.uniform(rngs.params(), (self.dt_rank, d_inner),
                                                    param_dtype, -bound, bound),
                                 logical_axes=(None, "mlp"))
        self.dt_bias = nnx.Param(_dt_bias(rngs.params(), d_inner), logical_axes=("mlp",),
                                 weight_decay=False)
        a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32),
                                         (d_inner, d_state)))
        self.A_log = nnx.Param(a_log, logical_axes=("mlp", None), weight_decay=False)
        self.D = nnx.Param(jnp.ones((d_inner,)), logical_axes=("mlp",), weight_decay=False)
        self.out_proj = Linear(d_inner, d_model, logical_axes=("mlp", "embed"),
                               init_scale=out_init_scale, **kw)
        self.implementation, self.chunk_size = implementation, chunk_size

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        check_cache_request(batch, max_len, dtype)
        del max_len  # a recurrent state does not grow with the sequence
        return {"conv": jnp.zeros((batch, self.d_conv - 1, self.d_inner), dtype),
                "ssm": jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32)}

    def __call__(self, x_BLD, positions_BL=None, *, segment_ids=None, cache=None, cache_index=None):
        del positions_BL, cache_index  # order is carried by the recurrence
        _check_input(x_BLD)
        if cache is not None:  # another batch was reported as a wrong conv state
            check_cache_batch(cache, x_BLD.shape[0], ("conv", "ssm"))
        parallel = _sequence_parallel(x_BLD, cache)
        xz = self.in_proj(x_BLD)
        x, z = jnp.split(xz, 2, axis=-1)
        x, conv_state = causal_depthwise_conv1d(x, self.conv_w[...], self.conv_b[...],
                                                None if cache is None else cache["conv"],
                                                segment_ids=segment_ids)
        x = jax.nn.silu(x)
        dt_raw, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], -1)
        dt = dt_raw @ self.dt_proj[...].astype(self.dtype)
        args = (x, dt, -jnp.exp(self.A_log[...]), B[:, :, None, :], C[:, :, None, :])
        kwargs = dict(D=self.D[...], z=z, dt_bias=self.dt_bias[...], dt_softplus=True,
                      implementation=self.implementation, chunk_size=self.chunk_size)
        if parallel:
            y, ssm_state = selective_scan_sequence_parallel(*args, mesh=current_mesh(),
                                                            segment_ids=segment_ids, **kwargs)
        else:
            y, ssm_state = selective_scan(
                *args, initial_state=None if cache is None else cache["ssm"],
                return_final_state=True, segment_ids=segment_ids, **kwargs)
        return self.out_proj(y), _new_cache(cache, conv_state, ssm_state)


def _new_cache(cache, conv_state, ssm_state):
    """The decode state after a call, in the dtypes of the one given: a ``lax.scan`` or
    ``fori_loop`` that carries the cache needs its types unchanged. The convolution keeps
    its state's dtype itself (ops.conv); the scans return their state in float32, which a
    caller's bfloat16 ``ssm`` cache would otherwise not get back."""
    if cache is None:
        return None
    return {"conv": conv_state.astype(cache["conv"].dtype),
            "ssm": ssm_state.astype(cache["ssm"].dtype)}


def _sequence_parallel(x_BLD, cache) -> bool:
    """Is the length of this (non-decoding) call split over the mesh's sequence axis?"""
    shards = sequence_axis_size()
    return cache is None and shards > 1 and x_BLD.shape[1] % shards == 0


class Mamba2(nnx.Module):
    """Mamba-2 block: one in-projection to (z, x, B, C, dt), causal conv + SiLU over (x, B, C),
    SSD with a scalar A per head, gated RMSNorm ``norm(y * silu(z))`` per group of heads,
    out-projection."""

    def __init__(self, d_model: int, *, d_state: int = 64, expand: int = 2, d_conv: int = 4,
                 head_dim: int = 64, groups: int = 1, chunk_size: int = 64, rngs: nnx.Rngs,
                 out_init_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32):
        _check_sizes(d_model=d_model, d_state=d_state, expand=expand, d_conv=d_conv,
                     head_dim=head_dim, groups=groups, chunk_size=chunk_size)
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"expand * d_model = {d_inner} must be a multiple of ssm_head_dim={head_dim}")
        self.heads = d_inner // head_dim
        if self.heads % groups:
            raise ValueError(f"ssm heads ({self.heads}) must be a multiple of ssm_groups={groups}")
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.head_dim, self.groups, self.chunk_size = head_dim, groups, chunk_size
        self.conv_dim = d_inner + 2 * groups * d_state
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear(d_model, d_inner + self.conv_dim + self.heads,
                              logical_axes=("embed", "mlp"), **kw)
        self.conv_w, self.conv_b = _conv_params(rngs, d_conv, self.conv_dim, param_dtype)
        self.dt_bias = nnx.Param(_dt_bias(rngs.params(), self.heads), logical_axes=(None,),
                                 weight_decay=False)
        a = jax.random.uniform(rngs.params(), (self.heads,), minval=1.0, maxval=16.0)
        self.A_log = nnx.Param(jnp.log(a), logical_axes=(None,), weight_decay=False)
        self.D = nnx.Param(jnp.ones((self.heads,)), logical_axes=(None,), weight_decay=False)
        self.norm_scale = nnx.Param(jnp.ones((d_inner,), param_dtype), logical_axes=("mlp",))
        self.out_proj = Linear(d_inner, d_model, logical_axes=("mlp", "embed"),
                               init_scale=out_init_scale, **kw)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        check_cache_request(batch, max_len, dtype)
        del max_len
        return {"conv": jnp.zeros((batch, self.d_conv - 1, self.conv_dim), dtype),
                "ssm": jnp.zeros((batch, self.heads, self.head_dim, self.d_state), jnp.float32)}

    def __call__(self, x_BLD, positions_BL=None, *, segment_ids=None, cache=None, cache_index=None):
        del positions_BL, cache_index
        _check_input(x_BLD)
        if cache is not None:
            check_cache_batch(cache, x_BLD.shape[0], ("conv", "ssm"))
        parallel = _sequence_parallel(x_BLD, cache)
        batch, length, _ = x_BLD.shape
        z, xbc, dt = jnp.split(self.in_proj(x_BLD), [self.d_inner, self.d_inner + self.conv_dim], -1)
        xbc, conv_state = causal_depthwise_conv1d(xbc, self.conv_w[...], self.conv_b[...],
                                                  None if cache is None else cache["conv"],
                                                  segment_ids=segment_ids)
        xbc = jax.nn.silu(xbc)
        x, B, C = jnp.split(xbc, [self.d_inner, self.d_inner + self.groups * self.d_state], -1)
        x = x.reshape(batch, length, self.heads, self.head_dim)
        B = B.reshape(batch, length, self.groups, self.d_state)
        C = C.reshape(batch, length, self.groups, self.d_state)
        kwargs = dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True,
                      initial_state=None if cache is None else cache["ssm"],
                      return_final_state=True)
        A = -jnp.exp(self.A_log[...])
        # The chunked SSD is a matmul algorithm, the accelerators' choice. On CPU the native
        # kernel's recurrence (ssd_native) beats both it and the lax.scan recurrence, forward
        # and backward (experiments/results/ssm.md, ssm_backward.md); for decoding steps the
        # plain recurrence is the cheapest everywhere.
        on_cpu = jax.default_backend() == "cpu"
        if parallel:
            del kwargs["initial_state"], kwargs["return_final_state"]
            y, ssm_state = ssd_sequence_parallel(
                x, dt, A, B, C, mesh=current_mesh(), chunk_size=None if on_cpu else self.chunk_size,
                segment_ids=segment_ids, **kwargs)
        elif (cache is not None and length <= 4) or (on_cpu and not native_scan_available()):
            y, ssm_state = ssd_reference(x, dt, A, B, C, segment_ids=segment_ids, **kwargs)
        elif on_cpu:
            y, ssm_state = ssd_native(x, dt, A, B, C, segment_ids=segment_ids, **kwargs)
        else:
            y, ssm_state = ssd(x, dt, A, B, C, chunk_size=self.chunk_size,
                               segment_ids=segment_ids, **kwargs)
        y = y.reshape(batch, length, self.d_inner)
        # state-spaces/mamba's RMSNormGated(norm_before_gate=False): statistics per group of
        # heads (group_size = d_inner // ngroups), eps 1e-5. The gate is formed in float32, as
        # there (and as Mamba-1 gates): in bfloat16 the product was rounded before the norm's
        # statistics (0.43% off float32 against 0.29%), and the norm returns the compute dtype
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        y = rms_norm(gated, self.norm_scale[...], 1e-5, groups=self.groups).astype(y.dtype)
        return self.out_proj(y), _new_cache(cache, conv_state, ssm_state)
