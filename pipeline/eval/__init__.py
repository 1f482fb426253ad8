"""Measuring a model, dense or masked: perplexity with the wikitext-2 protocol (`perplexity`), passkey,
needle-in-a-haystack and multi-key retrieval with greedy exact match (`retrieval`, on the prompt
templates of `prompts`), and zero-shot tasks through lm-evaluation-harness (`zeroshot`).

May import: `core`.
"""
