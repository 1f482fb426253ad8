"""How anything learns over a frozen model: the one training loop (`loop`: resume, lr schedule, log
and checkpoint cadence), atomic row-sharded checkpoints (`checkpoint`), the ddp / FSDP2 / DeepSpeed
strategies that place a model and its trained state (`shard`), and per-device memory plans (`plan`).
A learning method (N:M logits, attention gates, key scorers) supplies only its step.

May import: `core`.
"""
