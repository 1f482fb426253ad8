"""Reading and writing the world: streamed corpora with exact resume (`data`), mask artifacts and
atomic writes (`artifacts`), the formats others publish (`interop`: MaskLLM, DuoAttention), a run
directory's layout and owner (`rundir`), metric loggers (`loggers`), and the model a run's stages
share with every variant's masks and plan applied on demand (`session`).

May import: `core`, `train`, `eval`, `nm`, `attention`.
"""
