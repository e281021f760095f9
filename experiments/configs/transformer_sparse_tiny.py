"""transformer_tiny with sparse attention: a per-head mixture (MoA-style) of causal sliding
windows of 16, 32 and 64 bytes and one Longformer-style head (window 16 + 4 global tokens)."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="transformer_sparse_tiny",
        model=ModelConfig(
            d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
            attention_mask="heads:local:16;local:32;local:64;longformer:16,4",
        ),
        data=DataConfig(seq_len=128, batch_size=32),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=500, eval_every=125, checkpoint_every=250),
    )
