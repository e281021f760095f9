"""Context-parallel (ring) attention: queries, keys and values split along the sequence.

Each of the ``n`` devices on the mesh axis holds one chunk of the sequence. Keys and values
travel around the ring (``ppermute`` to the next device) for ``n`` steps; at every step a
device scores its own queries against the key/value chunk it holds and folds the result into a
running (max, sum, output) online softmax, so no device ever holds more than two chunks of keys
and values (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; the online softmax
of Milakov & Gimelshein 2018).

Masks are evaluated from global positions (``Mask.allowed`` on the positions a device holds),
so causal, sliding-window, chunked, strided, global-token and per-head masks all work, and
segment ids travel with their keys. Each shard's queries and keys are cut into parts of about
``PART_TARGET`` tokens, and which part pairs each device works at each step is known from the
mask's block table before tracing (:mod:`~jaxsparse.ops.attention.ring_plan`): a device visits
only its non-empty pairs, in one scan per step, so only one pair's logits are alive at a time
(FlashAttention's tiling, at the XLA level); a pair the mask leaves full folds without
evaluating the mask, one that packed documents empty skips its matmuls, and the ring runs
only the shortest run of consecutive steps (mod ``n``) that holds every step at which some
device has work: the far shards of a sliding window are neither computed nor exchanged, so a
causal window over ``n`` devices takes 2 steps, not ``n`` (an empty step inside the run, as
a strided mask can leave, is still relayed).

The gradient is written out (``custom_vjp``), as ring-flash-attention and FlashAttention-2's
backward (Dao 2023) do: the forward keeps each row's log-sum-exp, and the backward runs the
ring once more over the same pairs, recomputing each pair's probabilities from it; the keys'
gradients travel around the ring with their keys and one exchange at the end takes them home.
Autodiff of the forward instead recomputed every pair twice under nested checkpoints and
carried the cotangents of the whole online-softmax state.

The layouts (``"contiguous"``, load-balancing ``"zigzag"``) are described in
:mod:`~jaxsparse.ops.attention.ring_plan`; the op takes and returns contiguous shards either
way: two ``ppermute`` of each input half (even and odd halves are each a permutation of the
devices) move the halves into the zig-zag order, and two move the output back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxsparse.ops.attention.api import (attention_segments, check_attention_inputs,
                                         lazy_mask, static_logit_options)
from jaxsparse.ops.attention.online_softmax import empty_state, finish, fold_block
from jaxsparse.ops.attention.reference import soft_cap
from jaxsparse.ops.attention.ring_plan import (PART_TARGET, RING_LAYOUTS, choose_layout,
                                               critical_path, held_part, live_steps,
                                               ring_pair_kinds, ring_pair_lists, ring_work,
                                               split_parts, step_run)
from jaxsparse.ops.checks import check_integer, sequence_axis_of
from jaxsparse.ops.masks import EMPTY, FULL, PARTIAL, Mask, MultiHeadMask


def _allowed(mask, q_len, kv_len, q_pos, kv_pos):
    """Boolean ``[H or 1, Sq, Tc]`` for global positions ``q_pos [Sq]`` x ``kv_pos [Tc]``."""
    if mask is None:
        return jnp.ones((1, q_pos.size, kv_pos.size), bool)
    rows, cols = q_pos[:, None], kv_pos[None, :]
    if isinstance(mask, MultiHeadMask):
        return jnp.stack([jnp.broadcast_to(m.allowed_fn(q_len, kv_len)(rows, cols),
                                           (q_pos.size, kv_pos.size)) for m in mask.masks])
    return jnp.broadcast_to(mask.allowed_fn(q_len, kv_len)(rows, cols),
                            (q_pos.size, kv_pos.size))[None]


def _zigzag_device(half: int, n: int) -> int:
    """The device holding half ``half`` of ``2n`` in the zig-zag layout."""
    return half if half < n else 2 * n - 1 - half


def _to_zigzag(t, index, n: int, axis: str):
    """``t [B, chunk, ...]``, device ``index``'s contiguous chunk -> its zig-zag halves."""
    half = t.shape[1] // 2
    even = [(i, _zigzag_device(2 * i, n)) for i in range(n)]  # half 2i, from device i
    odd = [(i, _zigzag_device(2 * i + 1, n)) for i in range(n)]
    got_even = jax.lax.ppermute(t[:, :half], axis, even)
    got_odd = jax.lax.ppermute(t[:, half:], axis, odd)
    # device j holds halves j and 2n-1-j, of opposite parity: j's parity says which comes first
    first_is_even = index % 2 == 0
    return jnp.concatenate([jnp.where(first_is_even, got_even, got_odd),
                            jnp.where(first_is_even, got_odd, got_even)], axis=1)


def _from_zigzag(t, index, n: int, axis: str):
    """The inverse of :func:`_to_zigzag`: each half goes back to its contiguous device."""
    half = t.shape[1] // 2
    first, second = t[:, :half], t[:, half:]
    first_is_even = index % 2 == 0
    even_half = jnp.where(first_is_even, first, second)
    odd_half = jnp.where(first_is_even, second, first)
    even = [(_zigzag_device(2 * i, n), i) for i in range(n)]
    odd = [(_zigzag_device(2 * i + 1, n), i) for i in range(n)]
    return jnp.concatenate([jax.lax.ppermute(even_half, axis, even),
                            jax.lax.ppermute(odd_half, axis, odd)], axis=1)


def _checked_mask(q, k, v, mask, n, axis, layout):
    """The checked inputs' mask as a lazy :class:`Mask` (spec strings parsed) or None."""
    check_attention_inputs(q, k, v)
    _, q_len, q_heads, _ = q.shape
    kv_len = k.shape[1]
    mask = lazy_mask(mask, q_heads)
    if layout not in RING_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {RING_LAYOUTS}")
    for name, length in (("query length S", q_len), ("key length T", kv_len)):
        if length % n:
            raise ValueError(f"ring attention: {name}={length} must be divisible by mesh axis "
                             f"{axis!r} of size {n}")
        if layout == "zigzag" and length % (2 * n):
            raise ValueError(f"ring attention: {name}={length} must be divisible by twice the "
                             f"size of mesh axis {axis!r} ({2 * n}) for layout='zigzag' (every "
                             "shard holds two halves)")
    if isinstance(mask, Mask):
        mask.check_size(q_len, kv_len)
        if mask.num_heads is not None and mask.num_heads != q_heads:
            raise ValueError(f"mask is a MultiHeadMask of {mask.num_heads} heads; q has {q_heads}")
    elif mask is not None:
        raise ValueError(f"ring attention needs a lazy Mask object (got {type(mask).__name__}): "
                         "it evaluates the mask at global positions on each shard")
    return mask


def _matmul(equation: str, a, b, dtype):
    """``einsum`` on operands cast to ``dtype``, accumulated in float32 (flash attention's
    mixed precision: bfloat16 operands run at full rate, the softmax sees float32). HIGHEST
    precision, as the single-device paths (``reference``, ``blocksparse``): at the default,
    TPUs and TF32 GPUs round float32 operands to bfloat16-like mantissas, and the ring would
    drift ~1e-3 from the single-device result it promises (bfloat16 operands: no change)."""
    return jnp.einsum(equation, a.astype(dtype), b.astype(dtype),
                      preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def _parts(t, parts: int):
    """``[B, chunk, ...]`` -> ``[parts, B, chunk / parts, ...]``."""
    return jnp.moveaxis(t.reshape(t.shape[0], parts, t.shape[1] // parts, *t.shape[2:]), 1, 0)


def _unparts(t):
    """The inverse of :func:`_parts`."""
    t = jnp.moveaxis(t, 0, 1)
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])


def _rows_to_parts(t, parts: int, kv_heads: int):
    """Per-row statistics ``[B, chunk, Hq]`` -> ``[parts, B, Hkv, G, chunk / parts]``."""
    t = _parts(t, parts)                                   # [P, B, part, Hq]
    t = t.reshape(*t.shape[:3], kv_heads, t.shape[3] // kv_heads)
    return jnp.moveaxis(t, 2, 4)


def _parts_to_rows(t):
    """The inverse of :func:`_rows_to_parts`."""
    t = jnp.moveaxis(t, 4, 2)                              # [P, B, part, Hkv, G]
    return _unparts(t.reshape(*t.shape[:3], t.shape[3] * t.shape[4]))  # not -1: batch 0


class _Ring:
    """One ring's static plan and its per-shard forward and backward (run under ``shard_map``
    over ``axis``; each method sees one device's contiguous chunks)."""

    def __init__(self, *, mask, q_len, kv_len, n, axis, layout, parts, kv_heads, groups,
                 scale, logits_soft_cap, has_segments):
        self.mask, self.q_len, self.kv_len, self.n, self.axis = mask, q_len, kv_len, n, axis
        self.layout, self.parts, self.kv_heads, self.groups = layout, parts, kv_heads, groups
        self.scale, self.cap, self.has_segments = scale, logits_soft_cap, has_segments
        self.q_part, self.kv_part = q_len // n // parts, kv_len // n // parts
        kinds = ring_pair_kinds(mask, q_len, kv_len, n, layout, parts)
        self.first, self.count = step_run(live_steps(kinds), n)
        # the steps taken, in order: the shortest run (mod n) holding every live one (a
        # two-sided window visits the next shard's keys, step n - 1, first)
        self.run = (self.first + np.arange(self.count)) % n
        self.pairs = ring_pair_lists(kinds, self.run)      # 3 x [steps, n, L], numpy

    # -- layout -------------------------------------------------------------------------
    def positions(self, device, part_len):
        """Global positions ``[parts, part_len]`` of the parts of the chunk ``device`` holds."""
        first = held_part(self.layout, self.n, self.parts, device, jnp.arange(self.parts))
        return first[:, None] * part_len + jnp.arange(part_len)[None, :]

    def to_work(self, index, *ts):
        if self.layout != "zigzag":
            return ts
        return tuple(_to_zigzag(t, index=index, n=self.n, axis=self.axis) for t in ts)

    def from_work(self, index, *ts):
        if self.layout != "zigzag":
            return ts
        return tuple(_from_zigzag(t, index=index, n=self.n, axis=self.axis) for t in ts)

    def shift(self, t, by: int):
        """Device ``i``'s ``t`` goes to device ``i + by``."""
        if by % self.n == 0:
            return t
        return jax.lax.ppermute(t, self.axis, [(i, (i + by) % self.n) for i in range(self.n)])

    def varying(self, t):
        """Mark a value made on every shard alike (zeros) as differing per shard, as the
        branches of a switch and the carries of a scan must agree on it."""
        return jax.tree.map(lambda x: jax.lax.pcast(x, self.axis, to="varying"), t)

    # -- one part pair ----------------------------------------------------------------------
    def kind_in_documents(self, kind, q_seg, kv_seg):
        """Packed documents can empty a pair the mask keeps: then it is skipped."""
        kind = kind.astype(jnp.int32)
        if not self.has_segments:
            return kind
        return jnp.where(jnp.any(q_seg[:, :, None] == kv_seg[:, None, :]), kind, EMPTY)

    def allowed(self, kind, q_pos, kv_pos, q_seg, kv_seg):
        """Boolean ``[B|1, Hkv|1, G|1, Sq, Tc]`` (or a scalar): the mask at global positions,
        within documents. A ``FULL`` pair evaluates no mask."""
        allowed = jnp.ones((), bool)
        if kind == PARTIAL:
            allowed = _allowed(self.mask, self.q_len, self.kv_len, q_pos, kv_pos)
            allowed = (allowed.reshape(-1, 1, self.q_part, self.kv_part) if allowed.shape[0] == 1
                       else allowed.reshape(self.kv_heads, self.groups, self.q_part,
                                            self.kv_part))[None]
        if self.has_segments:
            allowed = allowed & (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
        return allowed

    def capped_logits(self, q_i, k_j):
        """``[B, Hkv, G, Sq, Tc]`` float32: scaled, soft-capped."""
        logits = _matmul("bshgd,bthd->bhgst", q_i, k_j, jnp.promote_types(q_i.dtype, k_j.dtype))
        return soft_cap(logits * self.scale, self.cap)

    # -- the ring ---------------------------------------------------------------------------
    def steps(self, body, carry, keys, index):
        """Run ``body(carry, keys, kv_pos, pairs) -> (carry, keys)`` at every step of the run,
        with ``keys`` (a tuple of part-major arrays, plus any gradients travelling with them)
        moved one device on between steps; returns the final carry and the keys of the last
        step, which sit ``first + count - 1`` devices past their owner."""
        keys = tuple(self.shift(t, self.first) for t in keys)  # start `first` devices back
        if not self.count:
            return carry, keys

        def attend(carry, keys, ring_step, pairs):
            kv_pos = self.positions((index - ring_step) % self.n, self.kv_part)
            return body(carry, keys, kv_pos, tuple(jnp.asarray(p)[index] for p in pairs))

        def step(state, xs):
            carry, keys = attend(*state, *xs)
            return (carry, tuple(self.shift(t, 1) for t in keys)), None

        # one scan over all steps but the last, each followed by an exchange (a loop of steps
        # would compile every step apart); the last step, after which nothing needs to move
        # on, runs outside it (the step compiles twice; a window's 2-step ring then exchanges
        # its keys once, not twice)
        run, pairs = jnp.asarray(self.run), self.pairs
        (carry, keys), _ = jax.lax.scan(step, (carry, keys),
                                        (run[:-1], tuple(p[:-1] for p in pairs)))
        return attend(carry, keys, run[-1], tuple(p[-1] for p in pairs))

    def forward_shard(self, q_c, k_c, v_c, q_seg_c, kv_seg_c):
        """``(out [B, chunk, Hq, D] contiguous, lse [B, chunk, Hq] in the working layout)``."""
        index = jax.lax.axis_index(self.axis)
        q_c, k_c, v_c, q_seg_c, kv_seg_c = self.to_work(index, q_c, k_c, v_c, q_seg_c, kv_seg_c)
        batch, q_chunk, q_heads, head_dim = q_c.shape
        q_parts = _parts(q_c.reshape(batch, q_chunk, self.kv_heads, self.groups, head_dim),
                         self.parts)                              # [P, B, Sq, Hkv, G, D]
        q_segs, q_pos = _parts(q_seg_c, self.parts), self.positions(index, self.q_part)
        keys = tuple(_parts(t, self.parts) for t in (k_c, v_c, kv_seg_c))
        state = self.varying(empty_state((self.parts, batch, self.kv_heads, self.groups,
                                          self.q_part), head_dim))

        def body(state, keys, kv_pos, pairs):
            k_parts, v_parts, kv_segs = keys

            def visit(state, pair):
                i, j, kind = pair
                q_i, q_pos_i, q_seg_i = q_parts[i], q_pos[i], q_segs[i]
                k_j, v_j, kv_pos_j, kv_seg_j = k_parts[j], v_parts[j], kv_pos[j], kv_segs[j]

                def fold_as(static_kind):
                    def fold(row_state):
                        allowed = self.allowed(static_kind, q_pos_i, kv_pos_j, q_seg_i, kv_seg_j)
                        return fold_block(row_state, self.capped_logits(q_i, k_j), allowed,
                                          lambda w: _matmul("bhgst,bthd->bhgsd", w, v_j, v_j.dtype))
                    return fold

                row = jax.tree.map(lambda t: t[i], state)
                row = jax.lax.switch(self.kind_in_documents(kind, q_seg_i, kv_seg_j),
                                     [lambda r: r, fold_as(PARTIAL), fold_as(FULL)], row)
                return jax.tree.map(lambda t, r: jax.lax.dynamic_update_index_in_dim(t, r, i, 0),
                                    state, row), None

            return jax.lax.scan(visit, state, pairs)[0], keys

        state, _ = self.steps(body, state, keys, index)
        out, lse = finish(state)                                  # [P, B, Hkv, G, Sq(, D)]
        out = _unparts(jnp.moveaxis(out, 4, 2).reshape(self.parts, batch, self.q_part, q_heads,
                                                      head_dim)).astype(q_c.dtype)
        (out,) = self.from_work(index, out)
        return out, _parts_to_rows(lse)

    def backward_shard(self, q_c, k_c, v_c, q_seg_c, kv_seg_c, d_out_c, delta_c, lse_w):
        """``(dq, dk, dv)`` contiguous, from the forward's ``lse`` (working layout) and
        ``delta = rowsum(d_out * out) [B, chunk, Hq]`` (contiguous)."""
        index = jax.lax.axis_index(self.axis)
        q_c, k_c, v_c, q_seg_c, kv_seg_c, d_out_c, delta_c = self.to_work(
            index, q_c, k_c, v_c, q_seg_c, kv_seg_c, d_out_c, delta_c)
        batch, q_chunk, q_heads, head_dim = q_c.shape
        grouped = (batch, q_chunk, self.kv_heads, self.groups, head_dim)
        q_parts = _parts(q_c.reshape(grouped), self.parts)        # [P, B, Sq, Hkv, G, D]
        do_parts = _parts(d_out_c.reshape(grouped), self.parts)
        lse, delta = (_rows_to_parts(t, self.parts, self.kv_heads) for t in (lse_w, delta_c))
        q_segs, q_pos = _parts(q_seg_c, self.parts), self.positions(index, self.q_part)
        keys = tuple(_parts(t, self.parts) for t in (k_c, v_c, kv_seg_c))
        qk_dtype = jnp.promote_types(q_c.dtype, k_c.dtype)
        ov_dtype = jnp.promote_types(d_out_c.dtype, v_c.dtype)
        d_q = self.varying(jnp.zeros(q_parts.shape, jnp.float32))
        d_kv = self.varying(jnp.zeros(keys[0].shape, jnp.float32))
        row_zeros = self.varying(jnp.zeros(q_parts.shape[1:], jnp.float32))
        key_zeros = self.varying(jnp.zeros(keys[0].shape[1:], jnp.float32))

        def body(d_q, keys, kv_pos, pairs):
            k_parts, v_parts, kv_segs, d_k, d_v = keys

            def visit(grads, pair):
                d_q, d_k, d_v = grads
                i, j, kind = pair
                q_i, do_i, lse_i, delta_i = q_parts[i], do_parts[i], lse[i], delta[i]
                q_pos_i, q_seg_i = q_pos[i], q_segs[i]
                k_j, v_j, kv_pos_j, kv_seg_j = k_parts[j], v_parts[j], kv_pos[j], kv_segs[j]

                def grads_as(static_kind):
                    def pair_grads():
                        capped = self.capped_logits(q_i, k_j)        # [B, Hkv, G, Sq, Tc]
                        allowed = self.allowed(static_kind, q_pos_i, kv_pos_j, q_seg_i, kv_seg_j)
                        p = jnp.where(allowed, jnp.exp(capped - lse_i[..., None]), 0.0)
                        dv_j = _matmul("bhgst,bshgd->bthd", p, do_i, ov_dtype)
                        dp = _matmul("bshgd,bthd->bhgst", do_i, v_j, ov_dtype)
                        ds = p * (dp - delta_i[..., None])
                        if self.cap is not None:  # d(cap·tanh(s/cap))/ds = 1 - tanh²
                            ds = ds * (1.0 - jnp.square(capped / self.cap))
                        ds = ds * self.scale
                        return (_matmul("bhgst,bthd->bshgd", ds, k_j, qk_dtype),
                                _matmul("bhgst,bshgd->bthd", ds, q_i, qk_dtype), dv_j)
                    return pair_grads

                dq_i, dk_j, dv_j = jax.lax.switch(
                    self.kind_in_documents(kind, q_seg_i, kv_seg_j),
                    [lambda: (row_zeros, key_zeros, key_zeros), grads_as(PARTIAL), grads_as(FULL)])

                def add(t, g, at):
                    return jax.lax.dynamic_update_index_in_dim(t, t[at] + g, at, 0)

                return (add(d_q, dq_i, i), add(d_k, dk_j, j), add(d_v, dv_j, j)), None

            (d_q, d_k, d_v), _ = jax.lax.scan(visit, (d_q, d_k, d_v), pairs)
            return d_q, (k_parts, v_parts, kv_segs, d_k, d_v)

        d_q, (*_, d_k, d_v) = self.steps(body, d_q, (*keys, d_kv, d_kv), index)
        # the keys' gradients sit `first + count - 1` devices past their owner: send them home
        d_k, d_v = (self.shift(t, -(self.first + self.count - 1)) for t in (d_k, d_v))
        d_q = _unparts(d_q).reshape(batch, q_chunk, q_heads, head_dim).astype(q_c.dtype)
        d_k, d_v = _unparts(d_k).astype(k_c.dtype), _unparts(d_v).astype(v_c.dtype)
        return self.from_work(index, d_q, d_k, d_v)


def ring_attention(q, k, v, *, mesh: Mesh, axis: str = "sequence", mask: Mask | None = None,
                   segment_ids=None, scale: float | None = None,
                   logits_soft_cap: float | None = None, layout: str | None = None,
                   part_tokens: int = PART_TARGET):
    """``dot_product_attention`` with the sequence split over mesh axis ``axis``.

    Args:
      q: ``[B, S, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (``Hq % Hkv == 0``); ``S`` and ``T`` must
        be divisible by the axis size (the shards hold equal chunks), and by twice it for
        ``layout="zigzag"``.
      mask: a lazy :class:`Mask` (or ``MultiHeadMask``) over global positions, a mask spec
        string (``"causal"``, ``"local:256"``, …), or None.
      segment_ids: ``[B, S]`` integers (needs ``S == T``) or a ``(q, kv)`` pair.
      layout: ``"contiguous"``, ``"zigzag"`` or None (the one with the shorter critical path
        for this mask; see :mod:`~jaxsparse.ops.attention.ring_plan`). Inputs and output are
        contiguous shards whatever the layout.
      part_tokens: about how long the parts are that each shard's queries and keys are
        worked in (:func:`split_parts` takes the divisor of the shard length nearest it on a
        log scale; shard lengths with few divisors can leave longer parts).
      Other axes of ``mesh`` stay under the compiler's automatic sharding.

    Returns ``[B, S, Hq, D]`` in ``q.dtype``, equal to the single-device result; rows with
    nothing to attend to are zero. Differentiable (reverse mode) in ``q``, ``k`` and ``v``.
    """
    n = sequence_axis_of(mesh, axis, "ring attention")
    mask = _checked_mask(q, k, v, mask, n, axis, layout)
    scale, logits_soft_cap = static_logit_options(scale, logits_soft_cap)
    check_integer("part_tokens", part_tokens)
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if layout is None:
        layout = choose_layout(mask, q_len, kv_len, n, part_tokens)
    q_seg, kv_seg = attention_segments(segment_ids, batch, q_len, kv_len)
    if segment_ids is None:  # one document: no same-document test (zeros fill the arguments)
        q_seg, kv_seg = jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32)
    ring = _Ring(mask=mask, q_len=q_len, kv_len=kv_len, n=n, axis=axis, layout=layout,
                 parts=split_parts(q_len // n, kv_len // n, part_tokens), kv_heads=kv_heads,
                 groups=q_heads // kv_heads, scale=head_dim**-0.5 if scale is None else scale,
                 logits_soft_cap=logits_soft_cap, has_segments=segment_ids is not None)

    seq, ids, rows = P(None, axis, None, None), P(None, axis), P(None, axis, None)
    shard = functools.partial(jax.shard_map, mesh=mesh, axis_names={axis})
    forward = shard(ring.forward_shard, in_specs=(seq, seq, seq, ids, ids), out_specs=(seq, rows))
    backward = shard(ring.backward_shard, in_specs=(seq, seq, seq, ids, ids, seq, rows, rows),
                     out_specs=(seq, seq, seq))

    @jax.custom_vjp
    def attend(q, k, v, q_seg, kv_seg):
        return forward(q, k, v, q_seg, kv_seg)[0]

    def attend_fwd(q, k, v, q_seg, kv_seg):
        out, lse = forward(q, k, v, q_seg, kv_seg)
        return out, (q, k, v, q_seg, kv_seg, out, lse)

    def attend_bwd(residuals, d_out):
        q, k, v, q_seg, kv_seg, out, lse = residuals
        # FlashAttention-2's D_i = rowsum(dO_i * O_i): d softmax needs it once per row
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        return (*backward(q, k, v, q_seg, kv_seg, d_out, delta, lse), None, None)

    attend.defvjp(attend_fwd, attend_bwd)
    with jax.named_scope("ring_attention"):  # findable in profiles and HLO metadata
        return attend(q, k, v, q_seg, kv_seg)


__all__ = ["PART_TARGET", "RING_LAYOUTS", "choose_layout", "critical_path", "held_part",
           "live_steps", "ring_attention", "ring_pair_kinds", "ring_pair_lists", "ring_work",
           "split_parts", "step_run"]
