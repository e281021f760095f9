"""A wider and deeper byte-level Transformer (benchmarks; a longer CPU run or an accelerator)."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="transformer_small",
        model=ModelConfig(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=704),
        data=DataConfig(seq_len=256, batch_size=32),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=100),
        train=TrainConfig(steps=2000, eval_every=500, checkpoint_every=500),
    )
