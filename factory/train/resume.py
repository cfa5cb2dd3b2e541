"""Where a `resume=true` run continues: the stages already finished in `run_dir` and the stage (if any) whose
mid-stage checkpoint holds a DeepSpeed state to continue from."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from factory.train import checkpoint as ckpt


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
