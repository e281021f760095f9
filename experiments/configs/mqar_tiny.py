"""Multi-query associative recall (Zoology) with a 2-layer Transformer; accuracy on answers."""

from jaxsparse.config import Config, DataConfig, EvalConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="mqar_tiny",
        model=ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=192),
        data=DataConfig(task="mqar", seq_len=64, batch_size=64, num_kv_pairs=4),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=100, weight_decay=0.0),
        train=TrainConfig(steps=1500, eval_every=250, checkpoint_every=500),
        eval=EvalConfig(batches=4),
    )
