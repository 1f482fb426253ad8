"""N:M weight masks over frozen linears: the primitives (`sparsity`: masks from scores, masks as
parametrizations, 2:4 semi-structured export), their compact encoding (`encoding`), one-shot masks
(`oneshot`: magnitude, Wanda, SparseGPT, DSnoT) and learned masks (`learn`: MaskLLM).

May import: `core`, `train`.
"""
