"""Attention masks over frozen weights: static per-head plans (`plans`: full or streaming KV heads,
DuoAttention; MoA windows) and how they run inside a Hugging Face model, and learning the gates that
choose a plan (`gates`, by distillation on synthetic passkey samples).

May import: `core`, `train`, `eval` (the prompt templates the synthetic samples share with retrieval).
"""
