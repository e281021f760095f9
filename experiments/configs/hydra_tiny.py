"""Hydra at CPU scale, the default of `jaxsparse train`: 4 blocks of diagonal SSM (after a
width-4 causal convolution, as in Mamba) + a chunk-level MoE feed-forward (4 experts, top-1,
routed per 16 tokens, weighted by the router's probability as in Switch: renormalised, the one
gate would be 1 and the router would learn from the balance loss only), sparse global attention in the third block (local window 32 + up to 32
controller-picked global tokens), a 4,096-slot product-key memory in block 1 and an 8-slot
workspace shared by blocks 1 and 3; the curriculum switches SGA on at step 100 and the
memories at step 200.

1200 steps: about ten minutes on two CPU cores, the duration of the comparison with the dense
baseline (`experiments/hydra/default_vs_dense.py`, which calibrates the step count to the
machine at hand).

The workspace is read by two blocks, not all four: each reading block runs the slot recurrence
(8 sequential chunk updates) on its own input, which cost 25-35% of the training step on 2 CPU
cores, while after 400 steps the validation bits per byte were the same with the workspace in
every block, in blocks 1 and 3, and without one (2.180, 2.178, 2.178; README, "Hydra").

The SSM's short convolution: 2.178 → 2.120 validation bits per byte after 400 steps, for
~4% more step time (README, "Hydra").

Peak learning rate 8e-3 (the Transformer's 3e-3 left Hydra behind per step: after 600 steps
2.15 bits/byte at 3e-3, 2.09 at 5e-3, 2.05 at 8e-3; README, "Hydra").

The measurements above predate 2026-12-07, when the MoE gate was renormalised (the router
learnt from the balance loss only); with the probability as the gate the default run ends at
1.849 bits per byte against 1.859 (README, "Hydra")."""

from jaxsparse.config import Config, DataConfig, ModelConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="hydra_tiny",
        model=ModelConfig(
            name="hydra", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
            expand=1, hydra_ssm_conv=4, hydra_sga_every=3, hydra_window=32, hydra_max_global=32,
            hydra_curriculum="sga:100,memory:200",
            moe_experts=4, moe_k=1, moe_renormalize=False, moe_every=1, moe_chunk=16,
            moe_d_ff=256,
            pkm_layers="1", pkm_slots=4096, pkm_heads=2, pkm_k_dim=64, pkm_knn=16,
            workspace_slots=8, workspace_chunk=16, workspace_layers="1,3"),
        data=DataConfig(seq_len=128, batch_size=32),
        optimizer=OptimizerConfig(lr=8e-3, warmup_steps=50),
        train=TrainConfig(steps=1200, eval_every=300, checkpoint_every=300),
    )
