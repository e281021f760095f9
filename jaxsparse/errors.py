"""Errors a run can end with and warnings it can give, importable without JAX (the command
line catches and prints them)."""


class NonFiniteTraining(RuntimeError):
    """A training step's loss or gradient was not finite, and ``train.nonfinite="stop"``."""


class SettingsWarning(UserWarning):
    """A warning about the user's settings or data, which the command line prints as its own
    (``jaxsparse train: warning: ...``, no library file and line: the cause is the user's)."""


class ScheduleChangeWarning(SettingsWarning):
    """A resumed run whose learning-rate schedule differs at the step it resumes from."""


class DataChangeWarning(SettingsWarning):
    """A resumed (or re-evaluated) run whose data settings differ from the saved run's, so its
    batches and validation windows do."""


class OlderConfigWarning(SettingsWarning):
    """A saved ``config.json`` that lacks settings this version has (it was written before they
    existed): they are read as today's defaults, which need not be what the run trained with."""


class CorpusWarning(SettingsWarning):
    """Something about the text corpus ``data.path`` matched that changes what the metrics
    mean (a single file: validation reads the training text)."""
