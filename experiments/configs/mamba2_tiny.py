"""A small byte-level Mamba-2 (SSD) LM on the default corpus (CPU-sized)."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="mamba2_tiny",
        model=ModelConfig(name="mamba2", d_model=128, n_layers=4, d_state=32, expand=2,
                          ssm_head_dim=32, ssm_chunk=32, tie_embeddings=True),
        data=DataConfig(seq_len=128, batch_size=32),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=500, eval_every=125, checkpoint_every=250),
    )
