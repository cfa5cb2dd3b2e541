"""A run folder (`run_dir`) is never silently reused.

* `prepare_folder` creates it with a clear error when a file stands in the way, the disk is read-only or full
  (train.py also calls it from a Hydra callback, hydra_folders.py, before Hydra would fail on the path with a trace).
* `RunLock` (`<run_dir>/run.lock`, JSON with pid, host, boot id and the process's start time) keeps two live runs
  out of one folder; a lock whose process is gone on this host is stale and taken over, with a note.
* `inspect_folder` says what an earlier run left; `refuse_reuse` stops a run into a folder that holds one unless
  `resume=true` or `overwrite=true`.
* overwrite=true moves the earlier run's files to `<run_dir>/replaced-<time>/` (`move_aside`); they are deleted only
  when the new run has finished (`drop_replaced`), so a failed new run never costs the old results.
* `os_error_message` turns read-only / disk-full / not-a-folder OSErrors into one paragraph naming the path and the fix.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from factory.errors import FactoryError

LOCK_FILE = "run.lock"
REPLACED_PREFIX = "replaced-"
STAGE_NAMES = ("pretrain", "instruct")
# Everything train.py writes at the top of a run folder (stage folders hold the checkpoints and eval outputs).
RUN_FILES = ("metrics.jsonl", "summary.json", "wandb", ".hydra")


def run_outputs(run_dir: Path) -> List[Path]:
    """The entries of `run_dir` that a train.py run wrote (never anything else a user keeps there)."""
    names = list(RUN_FILES)
    for stage in STAGE_NAMES:
        names += [stage, f".{stage}.tmp", f".{stage}.old"]
    return [run_dir / n for n in names if (run_dir / n).exists() or (run_dir / n).is_symlink()]


# ------------------------------------------------------------------------------------------------ environment faults
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}


def os_error_message(err: OSError, what: str) -> Optional[str]:
    """One paragraph for the OSErrors an environment causes (None for any other error). `what` says what was being
    done, e.g. 'writing the checkpoint'."""
    path = err.filename or "?"
    if err.errno in _FULL:
        free = _free_space(path)
        return (f"No space left on the disk while {what} ({path}; {free}). Free space there or point run_dir= at a "
                "disk with room. Checkpoints are written under a temporary name and renamed into place, so the last "
                "complete checkpoint is intact: continue with resume=true once there is space.")
    if err.errno == errno.EROFS:
        return (f"Cannot write {path} while {what}: the file system is read-only. Choose a writable location "
                "with run_dir=<folder>.")
    if err.errno in _READ_ONLY:
        return (f"Permission denied for {path} while {what}. Make it writable for this user, or choose another "
                "run_dir=<folder>.")
    if err.errno in _NOT_A_FOLDER or err.errno == errno.EISDIR:
        blocker = _first_non_folder(Path(path))
        if blocker is not None:
            return (f"{blocker} is a file, but {what} needs a folder there ({path}). Rename or remove that file, or "
                    "choose another run_dir=<folder>.")
        return f"Cannot create {path} while {what}: {os.strerror(err.errno)}. Choose another run_dir=<folder>."
    return None


def environment_fault_message(err: BaseException, run_dir: Path) -> Optional[str]:
    """The message for an error the environment caused during a run (None: not one). A full disk also hides behind
    other exception types: safetensors says 'os error 28', torch.save only 'unexpected pos'; so when the run folder's
    disk is (almost) full, that is reported, with the original error."""
    if isinstance(err, OSError):
        message = os_error_message(err, f"writing the run in {run_dir}")
        if message is not None:
            return message
    text = f"{type(err).__name__}: {err}"
    if "No space left on device" in text or "os error 28" in text or _nearly_full(run_dir):
        return (f"The disk of run_dir {run_dir} is full ({_free_space(str(run_dir))}); writing the run failed with "
                f"{text[:300]}. Free space there or point run_dir= at a disk with room. Checkpoints are written under "
                "a temporary name and renamed into place, so the last complete checkpoint is intact: continue with "
                "resume=true once there is space.")
    return None


def _nearly_full(path: Path, margin: int = 16 * 2**20) -> bool:
    try:
        return shutil.disk_usage(path).free < margin
    except OSError:
        return False


def _free_space(path: str) -> str:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:.0f} MiB free"
    except OSError:
        return "free space unknown"


def _first_non_folder(path: Path) -> Optional[Path]:
    """The first component of `path` (from the root down) that exists and is not a folder."""
    for candidate in reversed([path, *path.parents]):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def prepare_folder(path: Path, what: str = "creating the run folder") -> Path:
    """mkdir -p with one clear FactoryError for a file in the way, a read-only or a full disk."""
    path = Path(str(path)).expanduser()
    blocker = _first_non_folder(path)
    if blocker is not None:
        raise FactoryError(f"run_dir {path} cannot be created: {blocker} is a file, not a folder. Rename or remove "
                           "that file, or choose another run_dir=<folder>.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")  # a folder can exist on a read-only disk: find out now, not at the first checkpoint
        probe.unlink()
    except OSError as err:
        raise FactoryError(os_error_message(err, f"preparing run_dir {path}")
                           or f"run_dir {path} cannot be used: {err}. Choose another run_dir=<folder>.") from None
    return path


# ------------------------------------------------------------------------------------------------------------- lock
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> Optional[str]:
    """Start time of `pid` in clock ticks since boot (tells a live owner from a new process that reused its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: Dict) -> bool:
    """Whether the lock's owner still runs. Only decidable on the same host (and boot); elsewhere assume it does."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine: this one cannot tell
    if owner.get("boot_id") and _boot_id() and owner["boot_id"] != _boot_id():
        return False  # this machine rebooted since the lock was taken
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded, current = owner.get("pid_start"), _process_start(pid)
    return recorded is None or current is None or recorded == current


class RunLock:
    """`<run_dir>/run.lock`, created atomically (O_EXCL). Held by rank 0 for the whole run."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale_or_refuse()
                continue
            except OSError as err:
                raise FactoryError(os_error_message(err, "creating the run lock") or str(err)) from None
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
                     "pid_start": _process_start(os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "argv": sys.argv}
            self.held = True
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps(owner, indent=2) + "\n")
            except OSError as err:
                self.release()
                err.filename = err.filename or str(self.path)
                raise FactoryError(os_error_message(err, "creating the run lock") or str(err)) from None
            return
        raise FactoryError(f"Could not take the lock {self.path}: another run keeps taking it. Choose another run_dir.")

    def _clear_stale_or_refuse(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, json.JSONDecodeError):
            owner = {}
        if not isinstance(owner, dict):
            owner = {}
        if not owner and time.time() - self._mtime() < 10:  # another run is writing its lock right now
            raise FactoryError(f"run_dir {self.path.parent} is being taken by another run that started at the same "
                               "moment. Choose another run_dir=<folder>.")
        who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"
        if owner and _alive(owner):
            same_host = owner.get("host") == socket.gethostname()
            raise FactoryError(
                f"run_dir {self.path.parent} is in use by another run ({who}); two runs in one folder would "
                "overwrite each other's checkpoints and logs. Choose another run_dir=<folder>, or wait for that run "
                "to end." + ("" if same_host else f" This host cannot check a process on {owner.get('host')}: if "
                             f"that run is no longer running, delete {self.path} and start again.")
            )
        # the owner is gone (killed, crashed): take the lock over. Rename first, so two newcomers cannot both win.
        stale = self.path.with_name(f".{LOCK_FILE}.stale-{os.getpid()}")
        try:
            self.path.rename(stale)
            stale.unlink()
        except FileNotFoundError:
            return
        print(f"Note: removed a stale lock in {self.path.parent} ({who or 'unreadable'}; that process no longer "
              "runs).", file=sys.stderr, flush=True)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


# ------------------------------------------------------------------------------------------------- what is there
@dataclass
class FolderContents:
    finished: Dict[str, int] = field(default_factory=dict)     # stage -> steps
    unfinished: Dict[str, str] = field(default_factory=dict)   # stage -> "step 8 of 14"
    metrics_lines: int = 0
    has_summary: bool = False
    other: List[str] = field(default_factory=list)             # interrupted saves, wandb, provenance

    @property
    def holds_run(self) -> bool:
        return bool(self.finished or self.unfinished or self.metrics_lines or self.has_summary or self.other)

    def describe(self) -> str:
        parts = [f"finished stage {name} ({steps} step{'' if steps == 1 else 's'})"
                 for name, steps in self.finished.items()]
        parts += [f"unfinished stage {name} ({where})" for name, where in self.unfinished.items()]
        if self.metrics_lines:
            parts.append(f"metrics.jsonl with {self.metrics_lines} line{'' if self.metrics_lines == 1 else 's'}")
        if self.has_summary:
            parts.append("summary.json")
        parts += self.other
        return ", ".join(parts)


def inspect_folder(run_dir: Path) -> FolderContents:
    contents = FolderContents()
    for stage in STAGE_NAMES:
        for folder in (run_dir / stage, run_dir / f".{stage}.old"):
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if meta.get("complete"):
                contents.finished[stage] = int(meta.get("total_steps", 0))
            else:
                contents.unfinished[stage] = f"step {meta.get('step', '?')} of {meta.get('total_steps', '?')}"
            break
        else:
            if (run_dir / stage).exists() or (run_dir / f".{stage}.tmp").exists():
                contents.other.append(f"{stage} (an incomplete checkpoint)")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with metrics.open("rb") as handle:
            contents.metrics_lines = sum(1 for line in handle if line.strip())
    contents.has_summary = (run_dir / "summary.json").is_file()
    if (run_dir / "wandb").exists() and not contents.holds_run:
        contents.other.append("a wandb/ log")
    return contents


def refuse_reuse(run_dir: Path, contents: FolderContents) -> None:
    """A run without resume/overwrite into a folder that holds an earlier run."""
    state = "a finished run" if contents.has_summary else "an earlier run"
    raise FactoryError(
        f"run_dir {run_dir} already holds {state}: {contents.describe()}. A new run never reuses a folder "
        "silently. Pass resume=true to continue that run, overwrite=true to replace it (its files are moved to "
        f"{run_dir}/{REPLACED_PREFIX}<time>/ and deleted only once the new run has finished), or choose another "
        "run_dir=<folder>."
    )


def move_aside(run_dir: Path) -> Optional[Path]:
    """overwrite=true: move the earlier run's files into `replaced-<time>/`; returns that folder (None: nothing)."""
    entries = run_outputs(run_dir)
    if not entries:
        return None
    aside = run_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while aside.exists():
        suffix += 1
        aside = aside.with_name(f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
    try:
        aside.mkdir()
        for entry in entries:
            entry.rename(aside / entry.name)
    except OSError as err:
        raise FactoryError(os_error_message(err, "moving the replaced run aside")
                           or f"Could not move the earlier run in {run_dir} aside: {err}.") from None
    print(f"overwrite=true: moved the earlier run's files ({', '.join(e.name for e in entries)}) to {aside}; they "
          "are deleted once this run finishes and kept if it fails.", file=sys.stderr, flush=True)
    return aside


def drop_replaced(aside: Optional[Path]) -> None:
    """The new run finished: the files it replaced can go."""
    if aside is not None and aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
        print(f"overwrite=true: the new run finished; deleted the replaced run's files ({aside}).",
              file=sys.stderr, flush=True)


def write_invocation(run_dir: Path, cfg, overrides: Optional[List[str]], resumed: bool) -> None:
    """`.hydra/config.yaml` and `overrides.yaml` of this invocation (Hydra's own copy is switched off in
    configs/train.yaml because Hydra writes it before any check, over the files of the run a check then refuses).
    A resume keeps the original's and adds `.hydra/resume-<time>/`."""
    folder = run_dir / ".hydra"
    if resumed and (folder / "config.yaml").exists():
        folder = folder / f"resume-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if overrides is not None:
        (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
