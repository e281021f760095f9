"""Training: state, steps, loop, checkpoints, metrics, optimiser."""

from jaxsparse.train.loop import TrainResult, evaluate, load, sample_text, train

__all__ = ["TrainResult", "evaluate", "load", "sample_text", "train"]
