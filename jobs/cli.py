"""The `maskpipe` command line: thin recipes over the `pipeline` library.

Each command is one module of `jobs/commands/` (its flags and its body); this module only assembles the
parser from them and maps errors to exit codes. The quick commands (`oneshot`, `eval`, ...) build a
one-stage config and run the same stage function as `maskpipe run` (see `jobs/quick.py`), so there is one
way of doing each thing. `run` works in the foreground; `submit` hands the same run to a Ray cluster as a
Ray job whose entrypoint is `run` (see `jobs/ray_jobs.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from maskpipe.jobs.commands import (
    apply,
    export,
    import_,
    lm_eval,
    logs,
    oneshot,
    plan,
    publish,
    resume,
    retrieval,
    run,
    runs,
    status,
    stop,
    submit,
    tune,
    validate,
)
from maskpipe.jobs.commands import eval as eval_  # not the builtin
from maskpipe.pipeline import MaskpipeError

# In the order `maskpipe --help` lists them.
COMMANDS = [run, submit, status, logs, stop, resume, runs, tune, validate, oneshot, eval_, retrieval, plan, apply,
            publish, import_, export, lm_eval]


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none worth saying."""

    def _get_help_string(self, action):
        text = (action.help or "").strip("\u200b ")
        if ("default" not in text and action.default not in (None, False, [], argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            text += f"{' ' if text else ''}(default: {' '.join(map(str, action.default)) if isinstance(action.default, list) else action.default})"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if args and args[0].startswith("-") and not kwargs.get("help") and kwargs.get("default") not in (None, False):
            kwargs["help"] = "\u200b"  # argparse formats no help line, and so no default, for an option without help
        return super().add_argument(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from maskpipe.pipeline import __version__

    p = _Parser(prog="maskpipe", description="Learn sparsity masks over frozen LLM weights.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Ray's own console output")
    p.add_argument("--version", action="version", version=f"maskpipe {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add(sub)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Options and `key=value` overrides in any order: what follows an option is an override when
    the command takes overrides and it has the form key.path=value."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        sys.exit(0)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_writer(out: str | None):
    """Every command that writes `--out` holds that path's lock from start to end, so a second command
    writing the same path at the same time is refused at once, before any work, with one line."""
    if not out:
        return contextlib.nullcontext()
    from maskpipe.pipeline.io.artifacts import output_lock

    return output_lock(out)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    from maskpipe.pipeline.io.loggers import not_run_log_only

    for handler in logging.getLogger().handlers:  # a stage's error is printed once, as `error: ...`
        handler.addFilter(not_run_log_only)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if getattr(args, "check_out", None):
            args.check_out(args.out)  # where the lock file itself must not go (a run's artifacts)
        with _one_writer(getattr(args, "out", None)):
            return args.fn(args) or 0
    except MaskpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A file the command could not read or write (read-only output directory, a file where a
        # directory should be, a full disk): the file and the reason are all a user needs.
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
