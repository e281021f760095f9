"""Statistics and auxiliary losses that layers report to whoever runs them.

Layers call :func:`report` instead of ``Module.sow``. Inside ``nnx.capture`` (the training step
runs the model through :func:`run_capturing`) the value is sown as an
``nnx.Intermediate`` and collected; outside one there is nobody to collect it, so it is
dropped. (Flax 0.12.8 deprecates sowing outside ``nnx.capture``; its old behaviour stored the
value on the module, where it piled up call after call.)
"""

from __future__ import annotations

import jax
from flax import nnx


def report(module: nnx.Module, name: str, value) -> None:
    """Sow ``value`` under ``name`` when ``module`` runs inside ``nnx.capture``; else nothing.

    ``nnx.capture`` marks each module it runs with a ``__captures__`` attribute for the call's
    duration; ``Module.sow`` checks the same attribute. The training tests check that MoE and
    routing losses arrive, so a change of that mechanism in flax cannot go unnoticed."""
    if hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, name, value)


def run_capturing(model, method: str, *args, **kwargs):
    """``(getattr(model, method)(*args, **kwargs), sown)``: the call's result, and everything its modules
    sowed (``self.sow(nnx.Intermediate, name, x)``) as ``{name: [values]}``.

    Collected with ``nnx.capture`` (sowing outside it is deprecated since flax 0.12.8, and used
    to leave the values on the module, where a later call would find them again)."""
    result, captured = nnx.capture(lambda m, *a: getattr(m, method)(*a, **kwargs),
                                   nnx.Intermediate)(model, *args)
    by_name: dict[str, list[jax.Array]] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(captured))[0]:
        names = [getattr(k, "key", None) for k in path]
        name = next((n for n in reversed(names) if isinstance(n, str)), None)
        by_name.setdefault(name, []).append(value)
    return result, by_name
