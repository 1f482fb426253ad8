"""Who owns a run directory, whether its owner is alive, and how the run addresses its own files.

One process at a time writes a run directory: the driver of `maskpipe run` (foreground or a Ray job's
entrypoint), or briefly `submit`/`resume` while they set a run up. It holds `.lock`:

  .lock   JSON {"pid": int, "host": str, "started": ISO-8601 UTC}: the owner. The owner holds an
          exclusive `fcntl.flock` on it for its whole life; the kernel (or the NFS server) drops the
          lock when the process dies, however it dies, so a dead owner's lock is simply taken over.
          The file's mtime is the owner's heartbeat, touched every HEARTBEAT_S seconds.

Whether an owner is alive is therefore read from the lock itself; the heartbeat decides only where
locks are not shared (a filesystem without lock support seen from another host): an owner on another
host whose heartbeat is older than STALE_S is taken for dead.

Inside a run directory everything is addressed relative to the directory (`results.json` stores
`artifacts/wanda`, not `runs/x/artifacts/wanda`), so a run resumes from any working directory, on any
node that mounts it elsewhere, and after the directory was moved. `resolve` still reads the absolute
or cwd-relative paths that earlier versions stored.

`RunDir` owns the layout: every file and folder of a run is one of its properties or methods, and no
other module composes a path inside a run directory by hand.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from maskpipe.pipeline import MaskpipeError

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 4 * HEARTBEAT_S
# Folders a run writes its own outputs to: what a path stored by an older version is re-rooted at.
OWN = ("artifacts", "baselines", "retrieval", "checkpoints", "train", "tensorboard")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _read_owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(owner: dict) -> str:
    if not owner.get("pid"):
        return "another process"
    return f"pid {owner['pid']} on {owner.get('host', '?')} since {owner.get('started', '?')}"


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that cannot be one: a file, or a path under a file."""
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise MaskpipeError(f"{run_dir}: " + ("is a file, not a run directory" if p == run_dir
                                                      else f"{p} is a file, not a directory"))
            break


class RunLock:
    """Exclusive ownership of a run directory for the life of this object (a context manager).

    `wait` seconds are spent retrying a held lock before giving up: a submitted job's driver waits for
    the `submit` or `resume` that launched it to let go. The refusal names the owner:
    "RUN_DIR: run directory in use by pid N on HOST since T".

    With `path`, the lock is that file instead of RUN_DIR/.lock, and `what` names what is in use: an
    output path is locked by a file beside it (`pipeline.io.artifacts.output_lock`)."""

    def __init__(self, run_dir: str | Path, wait: float = 0.0, path: str | Path | None = None,
                 what: str = "run directory"):
        self.run_dir, self.wait, self.what = Path(run_dir), wait, what
        self.path = Path(path) if path is not None else self.run_dir / LOCK
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.path.parent == self.run_dir:
            check_run_dir(self.run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        try:
            while not self._try(fd):
                if time.monotonic() >= deadline:
                    raise MaskpipeError(f"{self.run_dir}: {self.what} in use by {describe(_read_owner(self.path))}")
                time.sleep(0.2)
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="maskpipe-heartbeat", daemon=True)
        self._beat.start()

    def _try(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        # No locks on this filesystem: the recorded owner and its heartbeat decide.
        return not _alive(self.path, probe=False)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a heartbeat missed is not worth failing the run over

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def owner(run_dir: str | Path) -> dict:
    """The recorded owner of a run directory ({} if none ever was): pid, host, started, heartbeat."""
    path = Path(run_dir) / LOCK
    info = _read_owner(path)
    if info:
        try:
            info["heartbeat"] = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(
                timespec="seconds")
        except OSError:
            pass
    return info


def alive(run_dir: str | Path, probe: bool = True) -> bool:
    """Whether a process owns the run directory now. `probe` tries the lock itself (and lets go at
    once); without it, or where locks are not shared, the pid (this host) or the heartbeat decides."""
    return _alive(Path(run_dir) / LOCK, probe)


def _alive(path: Path, probe: bool) -> bool:
    if not path.exists():
        return False
    if probe:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        except OSError:
            pass  # no lock support: fall through to pid and heartbeat
        finally:
            os.close(fd)
    info = _read_owner(path)
    if not info.get("pid"):
        return False
    if info.get("host") == socket.gethostname():
        return _pid_alive(int(info["pid"]))
    try:
        return time.time() - path.stat().st_mtime < STALE_S
    except OSError:
        return False


def relative(run_dir: Path, path: str | Path | None) -> str | None:
    """How a run stores a path: relative to its directory when inside it, else absolute."""
    if path is None:
        return None
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(p)


def resolve(run_dir: Path, stored: str | None) -> Path | None:
    """A path a run stored, as a path usable from here. Run-relative paths are joined to the run
    directory; an older version's absolute or cwd-relative path to one of the run's own files
    (`runs/x/artifacts/wanda`) is re-rooted at the run directory wherever it now is."""
    if stored is None:
        return None
    p = Path(stored)
    if not p.is_absolute() and (Path(run_dir) / p).exists():
        return Path(run_dir) / p
    parts = p.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in OWN:
            moved = Path(run_dir).joinpath(*parts[i:])
            if moved.exists():
                return moved
            break
    return p if p.is_absolute() else Path(run_dir) / p


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """A new run directory: OUTPUT_DIR/NAME-TIMESTAMP (with a counter if that exists)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(output_dir) / f"{name}-{stamp}"
    i = 1
    while path.exists():
        path = Path(output_dir) / f"{name}-{stamp}-{i}"
        i += 1
    return path


class RunDir:
    """Every path of one run directory (the layout README's "Main command" table lists). The layout is
    fixed: directories written by earlier versions resume unchanged.

    `artifacts` overrides where artifacts go: the `oneshot` quick command writes its artifact where
    `--out` says, outside any run directory."""

    def __init__(self, root: str | Path, artifacts: str | Path | None = None):
        self.root = Path(root)
        self._artifacts = Path(artifacts) if artifacts is not None else None

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- the run's own records
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def trackers(self) -> Path:
        return self.root / "trackers.json"

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    # -- what the stages write
    @property
    def artifacts(self) -> Path:
        return self._artifacts or self.root / "artifacts"

    def artifact(self, stage: str) -> Path:
        """The mask artifact of a mask-producing stage."""
        return self.artifacts / stage

    @classmethod
    def holding(cls, artifact: str | Path) -> RunDir | None:
        """The run directory whose `artifacts/` an artifact lies in, by the layout alone (None if it
        lies elsewhere); whether that is a run is the caller's question."""
        artifact = Path(artifact)
        return cls(artifact.parent.parent) if artifact.parent.name == "artifacts" else None

    def baseline_weights(self, stage: str) -> Path:
        """SparseGPT's updated weights: a baseline row only, never part of an artifact."""
        return self.root / "baselines" / stage / "updated_weights.safetensors"

    def checkpoints(self, stage: str) -> Path:
        """An in-process learning stage's checkpoints."""
        return self.root / "checkpoints" / stage

    @property
    def train(self) -> Path:
        """Ray Train's default storage for the learning stages' checkpoints."""
        return self.root / "train"

    def train_error(self, stage: str, rank: int) -> Path:
        """Where a rank of a Ray Train worker group records an error a restart would only repeat."""
        return self.train / f"error-{stage}-rank{rank}.json"

    def train_attempts(self, stage: str) -> Path:
        """How many times a Ray Train worker group of `stage` has started in the current `fit` (a restart
        after a lost worker is a second start)."""
        return self.train / f"attempts-{stage}.json"

    def retrieval(self, stage: str) -> Path:
        """A retrieval stage's per-variant sample records and NIAH heatmaps."""
        return self.root / "retrieval" / stage

    def tensorboard(self, stage: str) -> Path:
        return self.root / "tensorboard" / stage

    @property
    def wandb_segments(self) -> Path:
        return self.root / "wandb" / "segments"

    @property
    def tune(self) -> Path:
        """`maskpipe tune`: the sweep's results, Ray Tune's storage and the trials' run directories."""
        return self.root / "tune"

    @property
    def tune_config(self) -> Path:
        return self.tune / "config.yaml"

    @property
    def tune_results(self) -> Path:
        return self.tune / "results.json"

    @property
    def tune_results_md(self) -> Path:
        return self.tune / "results.md"

    def tune_trial(self, trial: str) -> Path:
        return self.tune / "trials" / trial

    # -- paths as the run stores them
    def relative(self, path: str | Path | None) -> str | None:
        return relative(self.root, path)

    def resolve(self, stored: str | None) -> Path | None:
        return resolve(self.root, stored)
