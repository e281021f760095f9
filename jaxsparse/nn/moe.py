"""Mixture-of-experts SwiGLU feed-forward layer.

Routers: ``"top_k"`` token choice, ``"expert_choice"`` (non-causal only), ``"random"`` (a
fixed, untrained router whose k grows during training: SMoE-Dropout, Chen et al. 2023).
``capacity_factor=None`` is dropless (sorted rows, grouped matmuls); a number gives fixed
per-expert buffers with priority dropping, sized from the tokens of each call (so decoding a
few tokens at a time drops none, and its outputs can differ from the full pass's; and as every
first choice goes before any second, a later token can push an earlier one out: not strictly
causal).
``chunk > 0`` routes chunks of that many consecutive tokens as one (from pooled
representations; causally, from the previous chunk).
Auxiliary losses are reported as ``aux_loss`` (:func:`jaxsparse.nn.intermediates.report`; the
training step collects them with ``nnx.capture`` and adds them to the loss); the
per-expert load and the dropped fraction are sown as ``moe_load`` / ``moe_dropped`` for the
training metrics. In eval mode (``Module.eval()``, used by evaluation and generation) nothing
is sown or counted and the router gets no jitter.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.errors import SettingsWarning
from jaxsparse.nn.batch_local import row_split
from jaxsparse.nn.expert_parallel import expert_parallel_moe, token_parallel_moe
from jaxsparse.nn.intermediates import report
from jaxsparse.nn.linear import Linear
from jaxsparse.nn.mlp import SwiGLU
from jaxsparse.ops.checks import (check_cache_request, check_integer, check_nonnegative,
                                  checked_decode_cache, is_real)
from jaxsparse.ops.moe import (GMM_IMPLEMENTATIONS, TokenChoice, balance_from_statistics,
                               capacity_dispatch, chunk_pool, chunk_pool_within_documents,
                               counted_mean, counted_weights,
                               dropless_dispatch, expert_capacity, expert_choice_capacity,
                               expert_choice_dispatch, expert_choice_routing, expert_fractions,
                               grouped_matmul, linear_k_schedule, router_z_loss, swiglu_experts,
                               top_k_routing, unchunk)
from jaxsparse.ops.sizes import round_up
from jaxsparse.parallel import current_mesh

ROUTERS = ("top_k", "expert_choice", "random")


class RouterStep(nnx.Variable):
    """Training steps seen by a layer (drives the SMoE-Dropout k schedule and the jitter
    noise); not a parameter, carried in the train state."""


class UntrainedRouterWarning(SettingsWarning):
    """Settings under which the router gets no gradient from the task loss."""


class EvalScaleWarning(SettingsWarning):
    """Settings under which eval mode scales the layer's output differently from training."""


class FixedRouterKernel(nnx.Variable):
    """The random router's kernel (``router="random"``, SMoE-Dropout): drawn at init and never
    trained, but the experts learn behind it, so a run that starts from these weights
    (``train.init_from``) keeps it (:func:`jaxsparse.train.state.learned_statistics`)."""


def _expert_weights(rngs, shape, fan_in, logical_axes, scale, param_dtype):
    std = math.sqrt(scale / fan_in) / 0.87962566103423978
    w = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, param_dtype) * std
    return nnx.Param(w, logical_axes=logical_axes)


class MoE(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, num_experts: int, k: int, *, rngs: nnx.Rngs,
                 router: str = "top_k", capacity_factor: float | None = None,
                 renormalize: bool = True, jitter: float = 0.0, chunk: int = 0,
                 causal: bool = True, shared_experts: int = 0, aux_weight: float = 0.01,
                 z_weight: float = 1e-3, k_end: int | None = None, k_schedule_steps: int = 1,
                 eval_k: int | None = None,
                 grouped_impl: str | None = None, out_init_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        if router not in ROUTERS:
            raise ValueError(f"router={router!r}: allowed {ROUTERS}")
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff),
                            ("k_schedule_steps", k_schedule_steps)):
            check_integer(name, value, 1)
        check_integer("k", k, 1, num_experts, f"in [1, num_experts={num_experts}]")
        if k_end is not None:
            check_integer("k_end", k_end, k, num_experts, f"in [k={k}, num_experts={num_experts}]")
        if eval_k is not None:
            check_integer("eval_k", eval_k, 1, num_experts, f"in [1, num_experts={num_experts}]")
        for name, value in (("renormalize", renormalize), ("causal", causal)):
            if not isinstance(value, bool):  # a string such as "no" would read as True
                raise ValueError(f"{name}={value!r}: must be True or False")
        check_integer("chunk", chunk, 0, allowed=">= 0 (0: token-level routing)")
        check_integer("shared_experts", shared_experts, 0)
        if capacity_factor is not None and (not is_real(capacity_factor)
                                            or not 0 < capacity_factor < math.inf):
            raise ValueError(f"capacity_factor={capacity_factor!r}: must be a finite number > 0, "
                             "or None (dropless)")
        if not 0 <= jitter < 1:  # a factor from [1 - jitter, 1 + jitter] must stay positive
            raise ValueError(f"jitter={jitter!r}: must be in [0, 1)")
        check_nonnegative("aux_weight", aux_weight)  # loss weights: NaN would poison the loss
        check_nonnegative("z_weight", z_weight)
        check_nonnegative("out_init_scale", out_init_scale)  # (as SwiGLU's)
        if router == "top_k" and renormalize and k == 1 and (k_end or 1) == 1:
            warnings.warn("renormalize=True with k=1 (model.moe_renormalize, model.moe_k): the "
                          "one gate is always 1, so the router learns only from the balance "
                          "and z losses, nothing from the task; set renormalize=False to weight "
                          "by the router's probability, as Switch does", UntrainedRouterWarning)
        if grouped_impl not in GMM_IMPLEMENTATIONS:
            raise ValueError(f"grouped_impl={grouped_impl!r}: allowed {GMM_IMPLEMENTATIONS}")
        if router == "expert_choice" and causal:
            raise ValueError("router='expert_choice' lets each expert pick among all tokens of "
                             "the batch, later ones included, so it leaks the future; it cannot "
                             "serve a causal decoder (use 'top_k')")
        if router == "expert_choice" and chunk:
            raise ValueError("router='expert_choice' does not support chunk-level routing")
        if router == "expert_choice" and (eval_k is not None or (k_end or k) != k):
            # (its capacity comes from capacity_factor or k: it would run as trained, silently)
            raise ValueError(f"router='expert_choice' takes no eval_k ({eval_k!r}) or k_end "
                             f"({k_end!r}): each expert picks its own tokens, so there is no "
                             "per-token k to change; use router='top_k' or 'random'")
        if router != "expert_choice" and not renormalize and eval_k not in (None, k_end or k):
            warnings.warn(
                f"eval_k={eval_k} with renormalize=False (model.moe_eval_k, "
                "model.moe_renormalize): evaluation weights each token's experts by the raw "
                f"top-{eval_k} router probabilities, whose sum differs from training's top-"
                f"{k_end or k} (up to 1 at eval_k=num_experts), so the layer's output changes "
                "scale; evaluating with more experts is meant for renormalize=True "
                "(SMoE-Dropout)", EvalScaleWarning)
        self.num_experts, self.k, self.router_kind = num_experts, k, router
        self.k_end = k_end if k_end is not None else k
        self.k_schedule_steps = k_schedule_steps
        self.capacity_factor, self.renormalize, self.jitter = capacity_factor, renormalize, jitter
        self.chunk, self.causal = chunk, causal
        self.aux_weight, self.z_weight = aux_weight, z_weight
        self.grouped_impl, self.dtype = grouped_impl, dtype
        self.eval_k = eval_k  # k in eval mode (SMoE-Dropout's "self-slimmable" use)
        self.deterministic = False  # set by Module.eval(): no jitter
        self.router = Linear(d_model, num_experts, logical_axes=("embed", None), rngs=rngs,
                             dtype=jnp.float32, param_dtype=param_dtype)
        if router == "random":  # a fixed random router: its kernel is not trained
            self.router.kernel = FixedRouterKernel(self.router.kernel.get_value())
        e, d, h = num_experts, d_model, d_ff
        self.w_gate = _expert_weights(rngs, (e, d, h), d, ("expert", "embed", "mlp"), 1.0, param_dtype)
        self.w_up = _expert_weights(rngs, (e, d, h), d, ("expert", "embed", "mlp"), 1.0, param_dtype)
        self.w_down = _expert_weights(rngs, (e, h, d), h, ("expert", "mlp", "embed"),
                                      out_init_scale, param_dtype)
        self.shared = (SwiGLU(d_model, d_ff * shared_experts, rngs=rngs, out_init_scale=out_init_scale,
                              dtype=dtype, param_dtype=param_dtype) if shared_experts else None)
        self.step = RouterStep(jnp.zeros((), jnp.int32))
        self.noise_key = RouterStep(jax.random.key_data(rngs.params()))

    # --- experts -------------------------------------------------------------------------

    def _weights(self):
        return tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))

    def _buffered_experts(self, x_ECD, weights=None):
        return swiglu_experts(x_ECD, *(weights or self._weights()))

    def _grouped_experts(self, rows, group_sizes, weights=None):
        gate, up, down = weights or self._weights()
        gmm = lambda x, w: grouped_matmul(x, w, group_sizes, implementation=self.grouped_impl)  # noqa: E731
        return gmm(jax.nn.silu(gmm(rows, gate)) * gmm(rows, up), down)

    # --- routing -------------------------------------------------------------------------

    def _active_k(self):
        """How many of the ``k_max`` routed choices carry weight now (``None``: all). The
        router always takes ``k_max`` choices, so that training (``k``, or the SMoE-Dropout
        schedule from ``k`` to ``k_end``) and eval mode (``eval_k``) share one program shape;
        the choices past the active ones get zero weight. Training never uses ``eval_k``."""
        if self.eval_k is not None and self.deterministic:
            active = self.eval_k
        elif self.k_end != self.k:
            return linear_k_schedule(self.step[...], k_start=self.k, k_end=self.k_end,
                                     steps=self.k_schedule_steps)
        else:
            active = self.k
        return None if active == self.k_max else active

    @property
    def capacity_k(self) -> int:
        """The most choices per token that carry weight in the current mode, which the
        capacity buffers are sized for: ``eval_k`` in eval mode when set, else ``k_end`` (the
        schedule's last k; ``k`` without one)."""
        return self.eval_k if self.eval_k is not None and self.deterministic else self.k_end

    def batch_router_inputs(self, x_BLD, router_inputs=None):
        """``router_inputs`` for a caller that splits the batch over devices: with jitter in
        training, the router inputs with the noise drawn for the whole batch, as one device
        draws it (drawn inside each shard, from the same key and the shard's shape, every
        device's rows got the same noise); else ``router_inputs`` as given (None: the layer
        computes them)."""
        if router_inputs is not None or not self.jitter or self.deterministic:
            return router_inputs
        return self.chunk_router_inputs(x_BLD) if self.chunk else self._router_input(x_BLD)

    def _router_input(self, x_BLD):
        x = x_BLD.astype(jnp.float32)
        if self.jitter and not self.deterministic:  # Switch: multiplicative U[1-eps, 1+eps]
            key = jax.random.fold_in(jax.random.wrap_key_data(self.noise_key[...]), self.step[...])
            x = x * jax.random.uniform(key, x.shape, jnp.float32, 1 - self.jitter, 1 + self.jitter)
        return x

    def __call__(self, x_BLD: jax.Array, *, router_inputs=None, segment_ids=None,
                 active=None) -> jax.Array:
        """``router_inputs [B, L, D]`` (optional): per-token inputs of the router, which then
        routes every token on its own (the decode path passes chunk-pooled ones).
        ``segment_ids [B, L]`` (packed documents): chunk-level routing pools only the tokens
        of each token's own document (:meth:`chunk_router_inputs`); token-level routing is
        per token already. (A capacity limit still counts every token the layer is given,
        across documents and rows: the batch on one device, each device's share on a mesh.)
        ``active`` (a 0/1 scalar, may be traced; Hydra's curriculum): 0 makes the layer's
        auxiliary losses and statistics 0 and leaves its step counter (the SMoE-Dropout k
        schedule) where it is, as for a layer that is not there yet."""
        d_model = self.w_gate.shape[1]
        if x_BLD.ndim != 3 or x_BLD.shape[-1] != d_model:
            raise ValueError(f"MoE input of shape {x_BLD.shape}: expected [batch, length, "
                             f"d_model={d_model}]")
        if not jnp.issubdtype(x_BLD.dtype, jnp.floating):
            raise ValueError(f"MoE input has dtype {x_BLD.dtype}; needs floating point")
        if router_inputs is not None and tuple(router_inputs.shape) != x_BLD.shape:
            # transposed ones were routed silently from the wrong tokens
            raise ValueError(f"router_inputs of shape {tuple(router_inputs.shape)}: expected "
                             f"{tuple(x_BLD.shape)}, one router input per token of the input")
        if active is not None and jnp.shape(active) != ():
            raise ValueError(f"active of shape {jnp.shape(active)}: must be a scalar (0: the "
                             "layer is off, as in Hydra's curriculum)")
        if self.chunk and router_inputs is None and (x_BLD.shape[1] % self.chunk
                                                     or segment_ids is not None):
            # pad: lengths need not divide; documents: per-token pools
            router_inputs = self.chunk_router_inputs(x_BLD, segment_ids)
        if x_BLD.shape[0] * x_BLD.shape[1] == 0:
            # an empty batch: no token to route (the statistics' means over no token were
            # NaN, and a capacity's dropped fraction 1)
            load = jnp.full((self.num_experts,), 1.0 / self.num_experts)
            return self._finish(x_BLD, jnp.zeros(x_BLD.shape, self.dtype), jnp.zeros(()), load,
                                jnp.zeros(()), active)
        mesh = current_mesh()
        if (mesh is not None and mesh.shape.get("expert", 1) > 1
                and self.router_kind != "expert_choice"):
            y, aux, load, dropped = expert_parallel_moe(self, x_BLD, mesh, router_inputs)
            return self._finish(x_BLD, y, aux, load, dropped, active)
        batch, length, d = x_BLD.shape
        tokens = batch * length
        x_TD = x_BLD.reshape(tokens, d).astype(self.dtype)
        if self.router_kind == "expert_choice":
            logits = self.router(self._router_input(x_BLD)).reshape(tokens, self.num_experts)
            capacity = expert_choice_capacity(tokens, self.num_experts,
                                              self.capacity_factor or self.k)
            choice = expert_choice_routing(logits, capacity)
            y_TD = expert_choice_dispatch(x_TD, choice, self._buffered_experts)
            aux = self.z_weight * router_z_loss(choice.logits)
            load = jnp.full((self.num_experts,), 1.0 / self.num_experts)
            dropped = jnp.zeros(())
        elif mesh is not None and row_split(mesh, x_BLD.shape):
            # data/FSDP parallel: each device dispatches its own tokens (a global sort and
            # gather of every token would be replicated on every device)
            y, aux, load, dropped = token_parallel_moe(self, x_BLD, router_inputs, mesh)
            return self._finish(x_BLD, y, aux, load, dropped, active)
        else:
            y_TD, aux, load, dropped = self._token_choice(x_BLD, router_inputs)

        return self._finish(x_BLD, y_TD.reshape(batch, length, d), aux, load, dropped, active)

    def _token_choice(self, x_BLD, router_inputs=None, mean=lambda v: v, weights=None,
                      router_kernel=None):
        """Route and dispatch ``x [B, L, D]`` by token choice: ``(y [B·L, D], aux, load,
        dropped)``; ``mean`` averages the statistics across devices, ``weights`` (gate, up,
        down) and ``router_kernel`` override the layer's own (see
        :func:`~jaxsparse.nn.expert_parallel.token_parallel_moe`)."""
        batch, length, d = x_BLD.shape
        tokens = batch * length
        x_TD = x_BLD.reshape(tokens, d).astype(self.dtype)
        choice, routed = self.route(x_BLD, router_kernel, router_inputs=router_inputs)
        if self.capacity_factor is None:
            # zero-weight choices (the k schedule's, or eval_k's in training) are not run
            # through the experts: they added nothing but compute (eval_k=4 over k=1: 4x)
            y_TD = dropless_dispatch(x_TD, choice,
                                     lambda rows, sizes: self._grouped_experts(rows, sizes, weights),
                                     skip_unweighted=True)
            dropped = jnp.zeros(())
        else:
            capacity = expert_capacity(tokens, self.num_experts, self.capacity_k,
                                       self.capacity_factor)
            y_TD, dropped = capacity_dispatch(x_TD, choice,
                                              lambda x: self._buffered_experts(x, weights), capacity)
        return y_TD, self.router_losses(routed, mean), self.load(choice, mean), mean(dropped)

    def chunk_router_inputs(self, x_BLD, segment_ids=None):
        """Per-token router inputs of chunk-level routing for any length: each token gets its
        chunk's pooled representation (padding the last chunk, which causal pooling never
        reads; non-causal pooling averages its real tokens only). With ``segment_ids``
        (packed documents) the pool is the mean over the tokens of the token's own document
        only (zeros if the chunk holds none), so routing never reads another document."""
        if segment_ids is not None:
            return chunk_pool_within_documents(self._router_input(x_BLD), segment_ids,
                                               self.chunk, causal=self.causal)
        batch, length, d = x_BLD.shape
        padded = round_up(length, self.chunk)
        x = jnp.pad(self._router_input(x_BLD), ((0, 0), (0, padded - length), (0, 0)))
        pooled = chunk_pool(x, self.chunk, causal=self.causal)
        if not self.causal and padded != length:
            real = jnp.minimum(length - jnp.arange(pooled.shape[1]) * self.chunk, self.chunk)
            pooled = pooled * (self.chunk / real)[None, :, None]
        return unchunk(pooled, self.chunk)[:, :length]

    def init_cache(self, batch: int, max_len: int = 0, dtype=jnp.float32):
        """Decode state of chunk-level routing: the running sum of the current chunk's router
        inputs and the mean of the last complete chunk; empty for token-level routing."""
        check_cache_request(batch)  # max_len and dtype: unused, the state is float32 sums
        if not self.chunk:
            return {}
        d = self.router.kernel.shape[0]
        return {"sum": jnp.zeros((batch, d), jnp.float32), "prev": jnp.zeros((batch, d), jnp.float32)}

    def decode(self, x_BLD, cache, cache_index):
        """Tokens at positions ``cache_index ..`` with the routing the full pass gives them."""
        if not self.chunk:
            return self(x_BLD), cache
        if not self.causal:
            raise ValueError("non-causal chunk routing cannot decode token by token")
        # the index places the chunk boundaries: a negative one would shift them silently
        cache_index = checked_decode_cache(cache, cache_index, x_BLD.shape[0], ("sum", "prev"))

        def step(carry, inputs):
            total, prev = carry
            x_t, pos = inputs
            total = total + x_t
            done = pos % self.chunk == self.chunk - 1
            return (jnp.where(done, 0.0, total), jnp.where(done, total / self.chunk, prev)), prev

        positions = cache_index + jnp.arange(x_BLD.shape[1])
        router_x = self._router_input(x_BLD).swapaxes(0, 1)
        (total, prev), inputs = jax.lax.scan(step, (cache["sum"], cache["prev"]),
                                             (router_x, positions))
        y = self(x_BLD, router_inputs=inputs.swapaxes(0, 1))
        return y, {"sum": total, "prev": prev}

    def route(self, x_BLD, router_kernel=None, router_inputs=None):
        """Token choice for ``x [B, L, D]`` (chunk-level if configured): ``(choice, routed)``,
        ``choice`` per token and ``routed`` per routing decision (for the losses).
        ``router_kernel`` overrides the layer's own (expert parallelism passes it in);
        ``router_inputs`` are given per-token router inputs (routed token by token)."""
        batch, length, _ = x_BLD.shape
        chunked = self.chunk and router_inputs is None
        router_x = self._router_input(x_BLD) if router_inputs is None else router_inputs
        if chunked:
            router_x = chunk_pool(router_x, self.chunk, causal=self.causal)
        kernel = self.router.kernel[...] if router_kernel is None else router_kernel
        logits = jnp.einsum("bld,de->ble", router_x, kernel.astype(jnp.float32))
        routed = top_k_routing(logits.reshape(-1, self.num_experts), self.k_max,
                               renormalize=self.renormalize, active_k=self._active_k())
        if self.chunk and self.causal:
            # the first chunk of a row (or of a document) pools nothing: an input of exact
            # zeros, uniform probabilities, expert 0 by the tie — not counted (counted_weights)
            routed = routed._replace(counted=jnp.any(router_x != 0, axis=-1).reshape(-1))
        if not chunked:
            return routed, routed
        tokens = batch * length
        expand = lambda t: unchunk(t.reshape(batch, length // self.chunk, *t.shape[1:]),  # noqa: E731
                                   self.chunk).reshape(tokens, *t.shape[1:])
        counted = None if routed.counted is None else expand(routed.counted)
        return TokenChoice(expand(routed.expert_index), expand(routed.weights), routed.probs,
                           routed.logits, counted), routed

    @property
    def k_max(self) -> int:
        return max(self.k_end, self.eval_k or 0)

    def router_losses(self, routed, mean=lambda v: v):
        """Weighted load-balancing + z losses; ``mean`` averages statistics across devices."""
        if self.router_kind != "top_k":  # a fixed random router has nothing to balance
            return jnp.zeros(())
        f = expert_fractions(routed.expert_index, self.num_experts, counted_weights(routed), mean)
        balance = balance_from_statistics(f, counted_mean(routed.probs, routed.counted, mean))
        return (self.aux_weight * balance
                + self.z_weight * router_z_loss(routed.logits, routed.counted, mean))

    def load(self, choice, mean=lambda v: v):
        """The ``moe_load`` statistic: each expert's share of the counted assignments (over all
        devices: ``mean`` as in :meth:`router_losses`); uniform when nothing is counted (a
        sequence within causal chunk routing's first chunk), as for an empty batch."""
        f = expert_fractions(choice.expert_index, self.num_experts, counted_weights(choice), mean)
        return jnp.where(jnp.sum(f) > 0, f, 1.0 / self.num_experts)

    def _finish(self, x_BLD, y, aux, load, dropped, active=None):
        if not self.deterministic:  # training: losses, statistics, the step counter
            on = jnp.ones((), jnp.int32) if active is None else (active > 0).astype(jnp.int32)
            report(self, "aux_loss", aux * on.astype(aux.dtype))
            report(self, "moe_load", load * on.astype(load.dtype))
            report(self, "moe_dropped", dropped * on.astype(dropped.dtype))
            self.step[...] = self.step[...] + on
        if self.shared is not None:
            y = y + self.shared(x_BLD)
        return y.astype(x_BLD.dtype)
