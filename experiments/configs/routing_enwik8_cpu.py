"""The Routing Transformer's character-level (enwik8-style) layout, scaled to a CPU: long byte
sequences, local attention in the lower half of the stack, and in the upper half half of the
heads routing through C ≈ √L clusters (L = 1024: 32 clusters, each query reading the 32 most
recent keys of its cluster) beside local heads with a 256-key window. The default corpus stands
in for enwik8."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="routing_enwik8_cpu",
        model=ModelConfig(name="routing_transformer", d_model=256, n_layers=8, n_heads=8,
                          n_kv_heads=8, d_ff=1024, max_seq_len=1024, routing_heads=4,
                          routing_clusters=32, routing_window=32, routing_local_window=256,
                          routing_skip_first=4),
        data=DataConfig(seq_len=1024, batch_size=8),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=200),
        train=TrainConfig(steps=5000, eval_every=500, checkpoint_every=500),
    )
