"""train.py's run folders under Hydra (configs/train.yaml registers both):

* `PrepareRunFolder`, a Hydra callback, creates the run (or sweep) folder before Hydra does, so a file in the way or a
  read-only disk ends in one clear message (exit 2) instead of Hydra's trace; it gives a second run started in the
  same second as another one its own default folder; it notes which keys a sweep varies.
* `sweep_job_dirname`, the resolver behind `hydra.sweep.subdir`: each sweep job's folder is
  `<run_dir>/<job number>_<its values of the swept keys>`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict, read_write

from factory.errors import FactoryError
from factory.train.run_folder import prepare_folder


# Keys a sweep varies (`tuner=mores,lora`), noted by PrepareRunFolder.on_multirun_start; None: unknown (then every
# override of a job names its folder).
_SWEPT_KEYS: Optional[set] = None
NOT_IN_JOB_NAME = ("run_dir", "resume", "overwrite")  # the same jobs must map to the same folders on resume


def register_sweep_resolver() -> None:
    """Make `${sweep_job_dirname:...}` (configs/train.yaml's hydra.sweep.subdir) known to OmegaConf."""
    if not OmegaConf.has_resolver("sweep_job_dirname"):
        OmegaConf.register_new_resolver("sweep_job_dirname", sweep_job_dirname)


def sweep_job_dirname(num, overrides) -> str:
    """`${sweep_job_dirname:${hydra.job.num},${hydra.overrides.task}}` (configs/train.yaml): `<num>_<the job's values
    of the swept keys>`, one folder level (no '/'), at most 120 characters (longer names end in a hash)."""
    items = []
    for item in (str(o) for o in overrides):
        key = item.split("=", 1)[0].lstrip("+~")
        if key not in NOT_IN_JOB_NAME and (_SWEPT_KEYS is None or key in _SWEPT_KEYS):
            items.append(item)
    name = (f"{num}_" + ",".join(sorted(items))).rstrip("_").replace("/", "_").replace("\\", "_")
    if len(name) > 120:
        name = name[:110] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def claim_fresh_folder(path: Path) -> Path:
    """Create `path`, or `path-1`, `path-2`, ... if taken: mkdir is atomic, so two runs never claim the same."""
    for attempt in range(1000):
        candidate = path if attempt == 0 else path.with_name(f"{path.name}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError:
            return path  # prepare_folder reports it with the fix
    return path


class PrepareRunFolder(Callback):
    """Registered under hydra.callbacks in configs/train.yaml (see the module docstring)."""

    def on_run_start(self, config, **kwargs) -> None:
        explicit = any(str(o).lstrip("+").startswith("run_dir=") for o in config.hydra.overrides.task)
        if explicit or os.environ.get("RANK", "0") != "0":  # other ranks get rank 0's folder from the recipe
            self._prepare(config.hydra.run.dir)
            return
        # The default run_dir is a timestamp: a second run started in the same second gets `<time>-1`, not a refusal.
        wanted = Path(str(config.hydra.run.dir))
        self._prepare(wanted.parent)
        claimed = claim_fresh_folder(wanted)
        if claimed != wanted:
            with read_write(config), open_dict(config):
                config.run_dir = str(claimed)  # hydra.run.dir is ${run_dir}; Hydra runs the job with this config

    def on_multirun_start(self, config, **kwargs) -> None:
        global _SWEPT_KEYS
        try:
            parsed = OverridesParser.create().parse_overrides([str(o) for o in config.hydra.overrides.task])
            _SWEPT_KEYS = {o.key_or_group for o in parsed if o.is_sweep_override()}
        except Exception:  # an unparsable override fails Hydra itself with its own message
            _SWEPT_KEYS = None
        self._prepare(config.hydra.sweep.dir)
        # Hydra's sweeper writes multirun.yaml unconditionally: keep an earlier sweep's copy (a resumed sweep)
        earlier = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if earlier.is_file():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(earlier.stat().st_mtime))
            kept = earlier.with_name(f"multirun.{stamp}.yaml")
            if not kept.exists():
                shutil.copy2(earlier, kept)

    @staticmethod
    def _prepare(path) -> None:
        try:
            prepare_folder(Path(str(path)))
        except FactoryError as err:
            print(f"Error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2)
