"""Static argument checks shared by the kernels' public entry points.

The kernels take operands already padded to whole blocks (the wrappers in ``jaxsparse.ops``
pad); an unpadded operand would otherwise read past its last block and return NaN or garbage
without an error. Every check here looks at static shapes and Python ints only, so it costs
nothing at run time and works under ``jit``.
"""

from __future__ import annotations

import numpy as np

BACKENDS = ("gpu", "tpu")


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def positive_int(where: str, name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{where}: {name}={value!r} must be an integer >= 1")


def backend(where: str, value) -> None:
    if value not in BACKENDS:
        raise ValueError(f"{where}: backend={value!r} must be one of {BACKENDS}")


def ndim(where: str, name: str, array, rank: int, layout: str) -> None:
    if np.ndim(array) != rank:
        raise ValueError(f"{where}: {name} must be {rank}-D {layout}, got shape "
                         f"{tuple(np.shape(array))}")


def shape(where: str, name: str, array, expected: tuple) -> None:
    got = tuple(np.shape(array))
    if got != tuple(expected):
        raise ValueError(f"{where}: {name}.shape={got} must be {tuple(expected)}")


def multiple(where: str, what: str, value: int, block_name: str, block: int) -> None:
    """``what`` (e.g. ``"q.shape[2]"``) of size ``value`` must be a multiple of ``block``."""
    if value % block:
        raise ValueError(f"{where}: {what}={value} must be a multiple of {block_name}={block} "
                         "(pad the operand to whole blocks)")


def power_of_two(where: str, name: str, value: int, minimum: int = 1) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{where}: {name}={value} must be a power of two >= {minimum} "
                         "(Triton block shapes)")


def scan_tiles(where: str, backend: str, interpret: bool, block_t: int, block_d: int,
               tpu_block_t: int) -> None:
    """A scan kernel's tiles: ``block_d`` a power of two on GPU (a Triton block); on TPU
    hardware ``block_t`` a multiple of ``tpu_block_t`` and ``block_d`` of 128 (interpret mode
    takes any)."""
    if backend == "gpu":
        power_of_two(where, "block_d", block_d)
    elif not interpret and (block_t % tpu_block_t or block_d % 128):
        raise ValueError(f"{where}: TPU tiles need block_t % {tpu_block_t} == 0 and "
                         f"block_d % 128 == 0; got block_t={block_t}, block_d={block_d}")


def attention_operands(where: str, q, k, v, kv_indices, kv_counts, q_indices, q_counts, *,
                       kv_len, block_q, block_kv, partial_blocks, kv_partial, q_partial,
                       q_segment_ids, kv_segment_ids) -> None:
    """The contract of both block-sparse attention kernels: ``q [B, Hq, S, D]``, ``k, v [B,
    Hkv, T, D]`` with ``Hq % Hkv == 0``, ``S`` and ``T`` whole blocks, one head's block table
    sized for them, ``kv_len <= T``, optional partial tiles and segment ids of matching
    shapes."""
    positive_int(where, "block_q", block_q)
    positive_int(where, "block_kv", block_kv)
    for name, arr in (("q", q), ("k", k), ("v", v)):
        ndim(where, name, arr, 4, "[batch, heads, seq, head_dim]")
    batch, q_heads, q_len, head_dim = q.shape
    _, kv_heads, kv_pad, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"{where}: k.shape={tuple(k.shape)} must be [{batch}, Hkv, T, {head_dim}] "
                         f"to match q.shape={tuple(q.shape)}")
    shape(where, "v", v, k.shape)
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"{where}: q heads Hq={q_heads} must be a multiple of k/v heads "
                         f"Hkv={kv_heads}")
    multiple(where, "q.shape[2]", q_len, "block_q", block_q)
    multiple(where, "k.shape[2]", kv_pad, "block_kv", block_kv)
    if not _is_int(kv_len) or not 0 <= kv_len <= kv_pad:
        raise ValueError(f"{where}: kv_len={kv_len!r} must be an integer in [0, k.shape[2]="
                         f"{kv_pad}]")
    q_blocks, kv_blocks = q_len // block_q, kv_pad // block_kv
    ndim(where, "kv_indices", kv_indices, 2, "[S/block_q, W]")
    ndim(where, "q_indices", q_indices, 2, "[T/block_kv, W']")
    if np.shape(kv_indices)[0] != q_blocks:
        raise ValueError(f"{where}: kv_indices.shape={tuple(np.shape(kv_indices))} must have "
                         f"S/block_q={q_len}/{block_q}={q_blocks} rows")
    if np.shape(q_indices)[0] != kv_blocks:
        raise ValueError(f"{where}: q_indices.shape={tuple(np.shape(q_indices))} must have "
                         f"T/block_kv={kv_pad}/{block_kv}={kv_blocks} rows")
    shape(where, "kv_counts", kv_counts, (q_blocks,))
    shape(where, "q_counts", q_counts, (kv_blocks,))
    given = [t is not None for t in (partial_blocks, kv_partial, q_partial)]
    if any(given) and not all(given):
        raise ValueError(f"{where}: partial_blocks, kv_partial and q_partial go together; got "
                         f"{dict(zip(('partial_blocks', 'kv_partial', 'q_partial'), given))}")
    if all(given):
        ndim(where, "partial_blocks", partial_blocks, 3, "[U, block_q, block_kv]")
        if tuple(np.shape(partial_blocks))[1:] != (block_q, block_kv):
            raise ValueError(f"{where}: partial_blocks.shape={tuple(np.shape(partial_blocks))} "
                             f"must be [U, block_q={block_q}, block_kv={block_kv}]")
        shape(where, "kv_partial", kv_partial, np.shape(kv_indices))
        shape(where, "q_partial", q_partial, np.shape(q_indices))
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(f"{where}: q_segment_ids and kv_segment_ids go together")
    if q_segment_ids is not None:
        shape(where, "q_segment_ids", q_segment_ids, (batch, q_len))
        shape(where, "kv_segment_ids", kv_segment_ids, (batch, kv_pad))
