"""Errors a run can end with and warnings it can give, importable without JAX (the command
line catches and prints them)."""


class NonFiniteTraining(RuntimeError):
    """A training step's loss or gradient was not finite, and ``train.nonfinite="stop"``."""


class ScheduleChangeWarning(UserWarning):
    """A resumed run whose learning-rate schedule differs at the step it resumes from."""


class DataChangeWarning(UserWarning):
    """A resumed (or re-evaluated) run whose data settings differ from the saved run's, so its
    batches and validation windows do."""


class OlderConfigWarning(UserWarning):
    """A saved ``config.json`` that lacks settings this version has (it was written before they
    existed): they are read as today's defaults, which need not be what the run trained with."""


class CorpusWarning(UserWarning):
    """Something about the text corpus ``data.path`` matched that changes what the metrics
    mean (a single file: validation reads the training text)."""
