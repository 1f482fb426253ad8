"""Attention masks over frozen weights: static per-head plans (`plans`: full or streaming KV heads,
DuoAttention; MoA windows) and how they run inside a Hugging Face model, learning the gates that
choose a plan (`gates`, by distillation on synthetic passkey samples), and content-aware dynamic masks
(`dynamic`: DMA's learned key scorer, the evicting KV cache; `kv_scores`: the kept-key rule and the
training-free baselines' scores, H2O, SnapKV, key norm, the oracle; `dynamic_masks`: a dynamic mask
as a run's variant, how it decodes and what it costs, and its form in an artifact).

May import: `core`, `train`, `eval` (the prompt templates the synthetic samples share with retrieval).
"""
