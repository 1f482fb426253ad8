"""What every layer shares: the N:M `Pattern` and the names of methods, strategies and dtypes
(`vocab`), the building blocks of every config and the schemas of models and corpora (`schema`), and
what a model is to maskpipe: loading it frozen, its decoder blocks and prunable linears, its
fingerprint (`models`).

May import: nothing else of `maskpipe.pipeline` (the package root's `MaskpipeError` aside).
"""
