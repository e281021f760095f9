"""Mask specifications as short strings, for configs and the command line.

Every pattern is causal (these are decoder masks):

==============================  ===========================================================
``causal``                      full causal attention
``local:W``                     sliding window of the last W positions (itself included)
``chunked:C``                   causal within consecutive chunks of C positions
``strided:S``                   Sparse Transformer strided: the last S positions and every
                                S-th position before them
``fixed:B,C``                   Sparse Transformer fixed: own block of B, and the last C
                                positions of every earlier block
``longformer:W,G``              window of W plus G global tokens at the start
``bigbird:B,W,G,R[,SEED]``      BigBird over blocks of B: W (odd) window blocks, G global blocks,
                                R random blocks (fixed by SEED, default 0)
``heads:SPEC*N;SPEC*N;...``     a different pattern per head (MoA-style); ``*N`` repeats
==============================  ===========================================================
"""

from __future__ import annotations

from jaxsparse.ops.masks import (BigBirdMask, CausalMask, ChunkedCausalMask, FixedMask,
                                 GlobalTokensMask, LocalMask, Mask, MultiHeadMask, StridedMask)

KINDS = ("causal", "local", "chunked", "strided", "fixed", "longformer", "bigbird", "heads")


# patterns with global tokens at a row's first positions: with packed documents (segment ids)
# they belong to the row's first document, and every other document attends through the
# window alone (block tables are static, document starts are data: they cannot follow them)
GLOBAL_TOKEN_KINDS = ("longformer", "bigbird")


def spec_kinds(spec: str) -> set[str]:
    """The kinds of pattern ``spec`` uses (each head's for ``heads:``), from its text alone."""
    kind, _, args = spec.strip().partition(":")
    if kind != "heads":
        return {kind}
    return set().union(*(spec_kinds(part.partition("*")[0]) for part in args.split(";")))


def _ints(spec: str, text: str, count: tuple[int, ...]) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")] if text else []
    except ValueError:
        raise ValueError(f"mask spec {spec!r}: expected integers after ':'") from None
    if len(values) not in count:
        raise ValueError(f"mask spec {spec!r}: expected {' or '.join(map(str, count))} numbers, "
                         f"got {len(values)}")
    if any(v < 0 for v in values):
        raise ValueError(f"mask spec {spec!r}: numbers must be >= 0")
    return values


def parse_mask_spec(spec: str, num_heads: int | None = None) -> Mask:
    """The causal :class:`Mask` described by ``spec`` (see the module docstring)."""
    if not isinstance(spec, str):
        raise TypeError(f"mask spec {spec!r}: expected a string such as 'causal' or 'local:256'")
    spec = spec.strip()
    kind, _, args = spec.partition(":")
    causal = CausalMask()
    if kind == "causal":
        _require(not args, spec, "'causal' takes no arguments")
        return causal
    if kind == "local":
        (w,) = _ints(spec, args, (1,))
        _require(w >= 1, spec, "the window must be >= 1")
        return LocalMask(w - 1, 0) & causal
    if kind == "chunked":
        (c,) = _ints(spec, args, (1,))
        _require(c >= 1, spec, "the chunk must be >= 1")
        return ChunkedCausalMask(c)
    if kind == "strided":
        (s,) = _ints(spec, args, (1,))
        _require(s >= 1, spec, "the stride must be >= 1")
        return causal & (LocalMask(s - 1, 0) | StridedMask(s))
    if kind == "fixed":
        b, c = _ints(spec, args, (2,))
        return causal & FixedMask(b, c)
    if kind == "longformer":
        w, g = _ints(spec, args, (2,))
        _require(w >= 1, spec, "the window must be >= 1")
        return causal & (LocalMask(w - 1, 0) | GlobalTokensMask(g))
    if kind == "bigbird":
        values = _ints(spec, args, (4, 5))
        _require(values[0] >= 1, spec, "the block must be >= 1")
        return causal & BigBirdMask(*values, causal=True)
    if kind == "heads":
        masks = []
        for part in args.split(";"):
            sub, star, times = part.partition("*")
            _require(not star or times.strip().isdigit(), spec, f"bad repeat count {times!r}")
            _require(not sub.strip().startswith("heads"), spec, "per-head specs cannot nest")
            masks += [parse_mask_spec(sub)] * (int(times) if star else 1)
        if num_heads is not None and len(masks) != num_heads:
            raise ValueError(f"mask spec {spec!r} gives {len(masks)} heads; the model has {num_heads}")
        return MultiHeadMask(tuple(masks))
    raise ValueError(f"unknown mask spec {spec!r}; kinds: {', '.join(KINDS)} "
                     "(e.g. 'local:256', 'bigbird:64,3,2,3', 'heads:local:64*4;causal*4')")


def _require(condition: bool, spec: str, why: str) -> None:
    if not condition:
        raise ValueError(f"mask spec {spec!r}: {why}")
