"""Multi-query associative recall (Zoology) with a 2-layer Transformer; accuracy on answers.

Sized to be learnt on a laptop CPU in a few minutes: with a vocabulary of 64 (31 keys, 32
values) the model leaves the "some value of the context" plateau (accuracy ~1/pairs) after
~500 steps and answers every query by the end (measured, this config on 2 CPU cores in four
minutes: 26.6 / 31.6 / 95.0 / 99.1 / 99.5 / 100% at steps 250 / 500 / ... / 1500). With
Zoology's large vocabularies (512 here: 20% after 600 steps and 21.9% after 2250; an
independent 60-line trainer plateaus the same way) the plateau lasts thousands of steps longer: every value token's copy map
has to be learnt from the few times it is seen.
"""

from jaxsparse.config import Config, DataConfig, EvalConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="mqar_tiny",
        model=ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=192),
        data=DataConfig(task="mqar", seq_len=64, batch_size=64, num_kv_pairs=4),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=100, weight_decay=0.0),
        train=TrainConfig(steps=1500, eval_every=250, checkpoint_every=500),
        eval=EvalConfig(batches=4),
    )
