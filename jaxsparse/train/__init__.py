"""Training: state, steps, loop, checkpoints, metrics, optimiser."""

from jaxsparse.train.loop import (NonFiniteTraining, TrainResult, evaluate, load, sample_bytes,
                                  sample_text, train)

__all__ = ["NonFiniteTraining", "TrainResult", "evaluate", "load", "sample_bytes", "sample_text",
           "train"]
