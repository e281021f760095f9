"""The dense baseline at CPU scale: a small byte-level Transformer on the Python standard
library's source (the default run, `hydra_tiny`, is compared with it; README, "Hydra").

Sized so that `jaxsparse train --config transformer_tiny` finishes in a few minutes on two CPU
cores and brings the validation bits per byte from ~8 (uniform over bytes) to well below 3.
"""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="transformer_tiny",
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
        data=DataConfig(seq_len=128, batch_size=32),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=500, eval_every=125, checkpoint_every=250),
    )
