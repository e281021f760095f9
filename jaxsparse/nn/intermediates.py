"""Statistics and auxiliary losses that layers report to whoever runs them.

Layers call :func:`report` instead of ``Module.sow``. Inside ``nnx.capture`` (the training step
runs the model through :func:`jaxsparse.train.step.run_capturing`) the value is sown as an
``nnx.Intermediate`` and collected; outside one there is nobody to collect it, so it is
dropped. (Flax 0.12.8 deprecates sowing outside ``nnx.capture``; its old behaviour stored the
value on the module, where it piled up call after call.)
"""

from __future__ import annotations

from flax import nnx


def report(module: nnx.Module, name: str, value) -> None:
    """Sow ``value`` under ``name`` when ``module`` runs inside ``nnx.capture``; else nothing.

    ``nnx.capture`` marks each module it runs with a ``__captures__`` attribute for the call's
    duration; ``Module.sow`` checks the same attribute. The training tests check that MoE and
    routing losses arrive, so a change of that mechanism in flax cannot go unnoticed."""
    if hasattr(module, "__captures__"):
        module.sow(nnx.Intermediate, name, value)
