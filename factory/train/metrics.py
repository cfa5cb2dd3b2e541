"""Where training numbers go: `<run_dir>/metrics.jsonl` (one JSON line per optimizer step, always, rank 0) and
wandb (offline by default; `logger=none` or WANDB_MODE=disabled turns it off)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional


class MetricsFile:
    """Append-only JSON-lines file. On resume, lines written after the checkpoint we resume from are dropped so
    the file reads as if the run had never been interrupted."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: Dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk fails at write/close, where the error carries no file name
            if err.filename is None:
                err.filename = str(self.path)
            raise

    def read(self) -> List[Dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, keep) -> None:
        """Keep only the records for which `keep(record)` is true (used when resuming)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill -9
                continue
            if keep(record):
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))


class WandbLogger:
    """Thin wrapper so the loop never has to know whether wandb is on. The WANDB_MODE environment variable wins
    over the config (`WANDB_MODE=disabled` is how tests and CI switch it off)."""

    def __init__(self, logger_cfg, run_dir: Path, config: Dict[str, Any], enabled: bool):
        self.run = None
        name = (logger_cfg or {}).get("name", "none")
        mode = os.environ.get("WANDB_MODE") or (logger_cfg or {}).get("mode", "offline")
        if not enabled or name == "none" or mode == "disabled":
            return
        import wandb  # optional: only a run that logs to Weights & Biases needs it installed

        self.run = wandb.init(
            project=logger_cfg.get("project", "factory"),
            name=logger_cfg.get("run_name") or Path(run_dir).name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            reinit="finish_previous",
        )

    def log(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log({f"{record.get('stage', 'train')}/{k}": v for k, v in record.items()
                          if isinstance(v, (int, float)) and k != "step"}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
