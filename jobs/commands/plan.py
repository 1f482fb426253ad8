"""`maskpipe plan`: the per-device memory of a config's learning stages, for every strategy, from the model's
config.json alone (no weights).
"""

from __future__ import annotations

from pathlib import Path

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.vocab import check_batch_split

ROOT = Path(__file__).resolve().parents[2]  # the project: configs/hf/ holds the shipped model configs


def add(sub) -> None:
    pl = sub.add_parser("plan", help="per-device memory of a config's learning stages, for every strategy")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. workers.strategy=fsdp")
    pl.add_argument("--gpus", type=int, default=None, help="devices (default workers.num_workers)")
    pl.add_argument("--gpu-memory", default="80GiB", help="memory per device, e.g. 80GiB")
    pl.add_argument("--hf-config", default=None,
                    help="directory or file with the model's config.json (default: the config's model)")
    pl.add_argument("--stage", default=None, help="only this learning stage")
    pl.set_defaults(fn=cmd_plan)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all: offline, huggingface_hub retries for half a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def cmd_plan(a) -> None:
    from transformers import AutoConfig

    from maskpipe.pipeline.config import load_config
    from maskpipe.pipeline.stages.learn import LearnStage
    from maskpipe.pipeline.train.plan import model_shape, parse_bytes, plan_report, stage_plan, what_fits

    cfg = load_config(a.config, a.overrides)
    learn = [s for s in cfg.stages if isinstance(s, LearnStage) and (a.stage is None or s.name == a.stage)]
    if not learn:
        raise MaskpipeError(f"{a.config}: no learning stage" + (f" named {a.stage!r}" if a.stage else ""))
    if a.gpus is not None and a.gpus < 1:
        raise MaskpipeError(f"--gpus: at least 1 device, got {a.gpus}")
    world = a.gpus or max(cfg.workers.num_workers, 1)
    if not any(c.isalpha() for c in a.gpu_memory):
        raise MaskpipeError(f"--gpu-memory: {a.gpu_memory!r} has no unit; write e.g. {a.gpu_memory}GiB")
    try:
        capacity = parse_bytes(a.gpu_memory)
    except ValueError as e:
        raise MaskpipeError(f"--gpu-memory: {e}") from None
    for st in learn:
        try:
            check_batch_split(st.batch_size, world)
        except ValueError as e:
            raise MaskpipeError(f"--gpus {world}: stage {st.name!r}: {e}") from None
    source = a.hf_config or cfg.model.name_or_path
    shipped = sorted(str(p.parent.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p.parent)
                     for p in (ROOT / "configs" / "hf").glob("*/config.json"))
    try:
        try:  # the cache or a local directory first: offline, the hub would be retried for half a minute
            hf = AutoConfig.from_pretrained(source, revision=None if a.hf_config else cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code, local_files_only=True)
        except (OSError, ValueError):
            if a.hf_config or Path(source).exists() or not _hub_reachable():
                raise
            hf = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise MaskpipeError(f"{source}: cannot read the model's config ({str(e).splitlines()[0]}); give --hf-config "
                            f"DIR (shipped: {', '.join(shipped)})") from None
    shape = model_shape(hf, cfg.model)
    for st in learn:
        print(plan_report(cfg, st, shape, world, capacity))
        if sum(stage_plan(cfg, st, shape, world).values()) > capacity:
            print("what would fit:\n" + "\n".join(what_fits(cfg, st, shape, world, capacity)))
