"""Hydra's staged curriculum: components switched on at given training steps.

The spec ``model.hydra_curriculum`` lists ``component:start_step`` pairs, e.g.
``"sga:200,moe:400,memory:600"`` — SSM only for 200 steps, then sparse global attention,
then the feed-forward/MoE branch, then both memories. Components it does not name are on
from step 0; each component may be named once (directly or through an alias). A component
that is off contributes nothing: its branch output and, for a MoE branch, its auxiliary
losses and statistics are multiplied by 0, so no gradient reaches its parameters or, through
it, the shared ones; and the train step leaves its parameters and gates exactly as they are
(no weight decay either, :meth:`jaxsparse.models.hydra.HydraLM.update_mask`). So its
LayerScale gate still holds its small initial value when it switches on, and each new branch
enters gently.

The stage is a pure function of the step, and the model counts its own training steps in a
variable that is part of the train state, so a resumed run continues in the right stage.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

COMPONENTS = ("ssm", "sga", "ffn", "pkm", "workspace")
ALIASES = {"moe": ("ffn",), "memory": ("pkm", "workspace"), "memories": ("pkm", "workspace")}


def parse_curriculum(spec: str) -> dict[str, int]:
    """Start step of every component (0 for those the spec does not name)."""
    return dict(_parse(spec))


def curriculum_entries(spec: str) -> list[tuple[str, tuple[str, ...], int]]:
    """The spec's entries in order as ``(entry, components it stages, start step)``, e.g.
    ``("memory:600", ("pkm", "workspace"), 600)``. Raises ValueError naming a malformed
    entry, an unknown component, or a component that two entries stage (directly or through
    an alias: ``"pkm:5,memory:10"``), which would leave one of them without effect."""
    return list(_entries(spec))


@functools.lru_cache(maxsize=64)  # the training loop asks at every step
def _entries(spec: str) -> tuple[tuple[str, tuple[str, ...], int], ...]:
    entries, staged_by = [], {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, step = part.partition(":")
        name = name.strip()
        if not sep:
            raise ValueError(f"{part!r}: expected component:start_step")
        targets = ALIASES.get(name, (name,) if name in COMPONENTS else None)
        if targets is None:
            raise ValueError(f"unknown component {name!r}; allowed "
                             f"{COMPONENTS + tuple(ALIASES)}")
        try:
            start = int(step)
        except ValueError:
            raise ValueError(f"{part!r}: the start step must be an int") from None
        if start < 0:
            raise ValueError(f"{part!r}: the start step must be >= 0")
        for target in targets:
            if target in staged_by:
                raise ValueError(f"component {target!r} is staged twice, by {staged_by[target]!r} "
                                 f"and by {part!r}; give each component one start step")
            staged_by[target] = part
        entries.append((part, targets, start))
    return tuple(entries)


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> tuple[tuple[str, int], ...]:
    starts = {name: 0 for name in COMPONENTS}
    for _, targets, start in _entries(spec):
        for target in targets:
            starts[target] = start
    return tuple(starts.items())


def stages(spec: str) -> list[tuple[int, tuple[str, ...]]]:
    """``[(first step, components on), ...]`` in order; one entry when nothing is staged."""
    starts = parse_curriculum(spec)
    steps = sorted(set(starts.values()) | {0})
    return [(s, tuple(c for c in COMPONENTS if starts[c] <= s)) for s in steps]


def stage_at(spec: str, step: int) -> int:
    """Index of the stage that step ``step`` trains in."""
    return sum(1 for first, _ in stages(spec)[1:] if step >= first)


def active_components(spec: str, step) -> dict[str, jnp.ndarray]:
    """``{component: 1.0 or 0.0}`` at ``step`` (a traced int is fine)."""
    starts = parse_curriculum(spec)
    step = jnp.asarray(step)
    return {name: (step >= start).astype(jnp.float32) if start else jnp.ones((), jnp.float32)
            for name, start in starts.items()}
