"""Errors a run can end with, importable without JAX (the command line catches them)."""


class NonFiniteTraining(RuntimeError):
    """A training step's loss or gradient was not finite, and ``train.nonfinite="stop"``."""
