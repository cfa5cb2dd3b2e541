"""Where a `resume=true` run continues: the stages already finished in `run_dir` and the stage (if any) whose
mid-stage checkpoint holds a DeepSpeed state to continue from; and whether the new config may continue them
(`check_resume_config`: only settings that do not change training may differ from the recorded config.yaml)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from omegaconf import OmegaConf

from factory import checkpoint as ckpt
from factory.errors import FactoryError


@dataclass
class ResumePoint:
    completed: Set[str] = field(default_factory=set)
    stage: Optional[str] = None   # the stage to continue mid-way
    step: int = 0                 # optimizer steps of `stage` already done

    def keeps_record(self, record: Dict[str, Any]) -> bool:
        """metrics.jsonl lines to keep: finished stages, and the resumed stage up to its checkpoint."""
        if record.get("stage") in self.completed:
            return True
        return record.get("stage") == self.stage and int(record.get("step", 0)) <= self.step


def recover_interrupted_saves(run_dir: Path, stage_names: List[str]) -> None:
    """Undo what a crash during a checkpoint save left behind (rank 0 only, before anyone reads the folders)."""
    for name in stage_names:
        ckpt.recover_interrupted_save(Path(run_dir) / name)


def find_resume_point(cfg, run_dir: Path, stage_names: List[str]) -> ResumePoint:
    point = ResumePoint()
    for name in stage_names:
        stage_dir = Path(run_dir) / name
        if not (stage_dir / ckpt.META_FILE).is_file():
            break
        meta = ckpt.read_meta(stage_dir)
        if meta.get("complete"):
            point.completed.add(name)
            continue
        point.stage, point.step = name, int(meta.get("step", 0))
        break
    if not point.completed and point.stage is None:
        print(f"resume=true but {run_dir} holds no checkpoint yet; starting from the beginning.", file=sys.stderr)
    return point


# --------------------------------------------------------------------------------------- what may change on resume
# A resumed run must continue the SAME training: every setting not listed here (model, tuner, data, schedule,
# seed, precision, DeepSpeed...) has to match the checkpoint's recorded config.yaml. These only change where things
# are written or logged, how fast it runs, how bad samples are handled and what is evaluated afterwards.
SAFE_ON_RESUME = (
    "run_dir", "resume", "overwrite", "logger", "eval",
    "trainer.save_every", "trainer.log_every", "trainer.num_workers", "trainer.cpu_threads",
    "trainer.gradient_checkpointing",
    "data.generate", "data.on_bad_sample", "data.max_bad_fraction", "data.verify_images", "data.max_aspect_ratio",
    "data.allow_outside_paths",
)
_SCHEDULE_KEYS = ("trainer.max_steps", ".epochs")
_ABSENT = "<absent>"


def _is_safe(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in SAFE_ON_RESUME)


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        if not node and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: node}


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Dotted key -> (recorded value, new value) for every leaf that differs (a missing key shows as <absent>)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    changes = {}
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, _ABSENT), flat_new.get(key, _ABSENT)
        if before != after:
            changes[key] = (before, after)
    return changes


def check_resume_config(cfg, run_dir: Path, point: ResumePoint) -> Dict[str, Tuple[Any, Any]]:
    """Compare the new resolved config with the config.yaml of every checkpoint the resume builds on. Refuse
    (FactoryError, diff-style) any change that alters training; return the safe changes, to be recorded."""
    new = OmegaConf.to_container(cfg, resolve=True)
    stages = sorted(point.completed) + ([point.stage] if point.stage else [])
    safe: Dict[str, Tuple[Any, Any]] = {}
    for name in stages:
        recorded_file = Path(run_dir) / name / ckpt.CONFIG_FILE
        try:
            old = OmegaConf.to_container(OmegaConf.load(recorded_file), resolve=True)
        except Exception as err:  # a hand-edited or damaged file
            raise FactoryError(f"Cannot resume {run_dir}: {recorded_file} is not a readable config ({err}). Start "
                               "a new run_dir.") from None
        changes = config_changes(old, new)
        # A key only one side has was added to (or dropped from) the factory's YAML since the checkpoint was written;
        # a new key's default keeps the earlier behaviour: allowed, reported and recorded like a safe change.
        unsafe = {k: v for k, v in changes.items() if not _is_safe(k) and _ABSENT not in v}
        if unsafe:
            raise FactoryError(_refusal(run_dir, name, recorded_file, unsafe))
        safe.update({k: v for k, v in changes.items() if k not in safe})
    return safe


def _refusal(run_dir: Path, stage: str, recorded_file: Path, unsafe: Dict[str, Tuple[Any, Any]]) -> str:
    lines = "\n".join(f"  {key}: {before!r} -> {after!r}" for key, before, after in
                      ((k, *v) for k, v in list(unsafe.items())[:20]))
    more = f"\n  ... and {len(unsafe) - 20} more" if len(unsafe) > 20 else ""
    hint = ""
    if any(k == _SCHEDULE_KEYS[0] or k.endswith(_SCHEDULE_KEYS[1]) for k in unsafe):
        hint += (" trainer.max_steps and epochs fix the length of the cosine learning-rate schedule, so a resumed "
                "stage keeps the schedule it started with; to train longer, start a new run_dir (stage 2 can reuse "
                f"a finished stage 1 with stage=instruct stage.init_from={Path(run_dir) / 'pretrain'}).")
    return (f"Cannot resume {run_dir}: the new config differs from the one its {stage!r} checkpoint was trained "
            f"with ({recorded_file}) in settings that change what is trained:\n{lines}{more}\nA resume must continue "
            "the same training: pass the recorded values again, or start a new run_dir." + hint
            + f" Settings that may change on resume: {', '.join(SAFE_ON_RESUME[3:])}.")


def describe_changes(changes: Dict[str, Tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
