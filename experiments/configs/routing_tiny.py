"""The default Transformer's size with routing attention (Roy et al. 2021): the first two
layers attend to a causal window of 32 keys; in the upper two, two of four heads stay local
and two route through 8 k-means clusters, each query reading the 16 most recent keys of its
cluster (C ≈ √L, w = L/C at L = 128)."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="routing_tiny",
        model=ModelConfig(name="routing_transformer", d_model=128, n_layers=4, n_heads=4,
                          n_kv_heads=4, d_ff=384, routing_heads=2, routing_clusters=8,
                          routing_window=16, routing_local_window=32, routing_skip_first=2),
        data=DataConfig(seq_len=128, batch_size=32),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=500, eval_every=125, checkpoint_every=250),
    )
