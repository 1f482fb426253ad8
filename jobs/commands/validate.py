"""`maskpipe validate`: check a config (and its inputs) without running it."""

from __future__ import annotations


def add(sub) -> None:
    v = sub.add_parser("validate", help="check a config without running it")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--print", action="store_true", help="print the resolved config")
    v.set_defaults(fn=cmd_validate)


def cmd_validate(a) -> None:
    from maskpipe.pipeline.config import dump_config, load_config
    from maskpipe.pipeline.run.preflight import check_inputs

    cfg = load_config(a.config, a.overrides)
    check_inputs(cfg, a.config)
    if a.print:
        print(dump_config(cfg))
    print(f"{a.config}: ok ({len(cfg.stages)} stages: {', '.join(s.name for s in cfg.stages)})")
