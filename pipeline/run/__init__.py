"""Running and reporting a run: the order of its stages, resume and status (`runner`), the checks
before any model work (`preflight`), `results.json` and every table rendered from it (`results`),
sweep recipes (`tune`) and a published folder with its model card (`publish`).

May import: everything in `maskpipe.pipeline` (it is the top), never Ray (`workers` brings Ray).
"""
