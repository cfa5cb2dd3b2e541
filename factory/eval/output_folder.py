"""The output folder of a benchmark run: usable (a writable folder), and keyed.

Answers are cached in the output folder so that an interrupted run resumes where it stopped. They are reused only
when they were made by the same model under the same generation settings: `cache_key.json` records those settings
(checkpoint identity, dtype, template and the prompt ids it gives, decoding, max_new_tokens, benchmark, question
file content, image folder)
and their hash. Settings that cannot change an answer (batch size, number of processes, limit, device, model_id)
are left out, so resuming with another batch size or process count still reuses every answer.

A folder holding answers made otherwise is never written to and never deleted: the run goes to the sibling folder
`<output_dir>-<first 8 hex digits of the key>` (which the same settings find again next time) and says so. The
modality-imbalance analysis (`imbalance.json`) is keyed the same way, so a second analysis never replaces a first.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from factory.errors import FactoryError
from factory.eval.generate import conversation_for, template_of

KEY_FILE = "cache_key.json"
KEY_FORMAT = 1
# files that show a folder holds the results of an evaluation (answer parts, merged answers, scores)
RESULT_GLOBS = ("answers.part*.jsonl", "answers.jsonl", "results.json", "imbalance.json")
CHECKPOINT_FILES = ("config.yaml", "meta.json", "trainable.safetensors")


# -------------------------------------------------------------------------------------------------- identities
def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(folder: Path) -> Dict[str, str]:
    """What a checkpoint folder is: the sha256 of each file that defines the model (weights, config, meta)."""
    return {name: file_sha256(Path(folder) / name) for name in CHECKPOINT_FILES if (Path(folder) / name).is_file()}


def model_fingerprint(model) -> Dict[str, str]:
    """For a model handed over in Python (no checkpoint folder): sha256 of its config and of its trained weights
    (every weight when nothing is marked trainable). Frozen weights come from the config's paths."""
    digest = hashlib.sha256(json.dumps(getattr(model, "config", {}), sort_keys=True, default=str).encode())
    state = model.trainable_state_dict() if hasattr(model, "trainable_state_dict") else {}
    if not state:
        state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"weights_and_config": digest.hexdigest()}


def prompt_probe(model, question: Dict[str, Any]) -> str:
    """sha256 of the prompt token ids the model gets for `question`: a change in how prompts are built (template
    text, system prompt, image placement, tokenizer) changes it, even with the same template name."""
    ids = template_of(model).encode_prompt(conversation_for(question), model.tokenizer, model.image_token_count)
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


def generation_settings(model, benchmark: str, question_file: Path, image_folder: Optional[Path],
                        max_new_tokens: int, identity: Optional[Dict[str, str]] = None,
                        extra: Optional[Dict[str, Any]] = None,
                        probe_question: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything an answer depends on. `identity`: checkpoint_identity of the checkpoint the model came from
    (eval.py); None → fingerprint the model itself. `probe_question`: a question whose prompt ids are hashed in."""
    dtype = next(model.parameters()).dtype if hasattr(model, "parameters") else None
    settings = {
        "benchmark": benchmark,
        "model": dict(identity) if identity else model_fingerprint(model),
        "dtype": str(dtype).replace("torch.", ""),
        "template": getattr(model, "template", None),
        "decoding": "greedy",
        "max_new_tokens": int(max_new_tokens),
        "question_file_sha256": file_sha256(question_file),
        "image_folder": str(Path(image_folder).resolve()) if image_folder else None,
    }
    if probe_question is not None:
        settings["prompt_sha256"] = prompt_probe(model, probe_question)
    settings.update(extra or {})
    return settings


def settings_key(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ usable folder
def ensure_writable_dir(path: Path, hint: str = "") -> Path:
    """Create `path` if needed and check that files can be written there; a file in the way, a read-only or full
    disk → FactoryError naming the folder and the fix."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise FactoryError(f"Cannot write the evaluation results to {path}: {blocker} is a file, not a folder. "
                           f"{hint}Pass output_dir=<a folder> (it is created if missing).")
    probe = path / f".write-test.{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise FactoryError(f"Cannot write the evaluation results to {path} ({describe_os_error(err)}). {hint}"
                           "Pass output_dir=<a writable folder>.") from None
    return path


def describe_os_error(err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.errno == errno.EROFS:
        return f"{reason}: the disk is mounted read-only"
    if err.errno == errno.ENOSPC:
        return f"{reason}: the disk is full"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{reason}: no permission to write there"
    return reason


WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


def write_error(err: OSError, requested: Path) -> Optional[FactoryError]:
    """The FactoryError for a failed write under the output folder (or its keyed sibling), else None."""
    name = str(err.filename or "")
    if err.errno not in WRITE_ERRNOS or not name.startswith(str(Path(requested))):
        return None
    return FactoryError(f"Writing the evaluation results failed at {name} ({describe_os_error(err)}). Answers "
                        "written so far are kept: fix the disk or folder and run the same command again to resume, "
                        "or pass output_dir=<a writable folder>.")


# ------------------------------------------------------------------------------------------------ keyed folder
def read_key(folder: Path) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads((Path(folder) / KEY_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {}  # unreadable or damaged: nothing can be assumed about its answers
    return record if isinstance(record, dict) else {}


def folder_state(folder: Path, key: str) -> Tuple[str, Optional[Dict[str, Any]]]:
    """'free' (no results in it), 'same' (results made with `key`) or 'other' (results made otherwise, or with no
    record of how), and the recorded key file."""
    folder = Path(folder)
    record = read_key(folder) if folder.is_dir() else None
    if record is not None and record.get("key") == key:
        return "same", record
    has_results = folder.is_dir() and any(next(folder.glob(g), None) is not None for g in RESULT_GLOBS)
    if record is None and not has_results:
        return "free", None
    return "other", record


def keyed_output_dir(requested: Path, settings: Dict[str, Any], announce: bool = True) -> Path:
    """The folder this run's answers go to (see the module docstring), with the key file written before any
    answer. Every rank of a sharded run reaches the same folder: the choice depends only on the key files."""
    requested = Path(requested)
    key = settings_key(settings)
    sibling = requested.with_name(f"{requested.name}-{key[:8]}")
    state, record = folder_state(requested, key)
    sibling_state, _ = folder_state(sibling, key)
    if state == "same" or (state == "free" and sibling_state != "same"):
        target = requested
    elif sibling_state == "other":
        raise FactoryError(f"Both {requested} and {sibling} hold answers made with other settings than this run's; "
                           "nothing was written. Pass output_dir=<a new folder>.")
    else:  # the requested folder holds other answers (or none, while the sibling holds this key's)
        target = sibling
        if announce and state == "other":
            print(f"note: {requested} holds answers made {describe_difference(record, settings)}; they are kept as "
                  f"they are. This evaluation writes to {sibling} instead (the same checkpoint and settings resume "
                  "there next time). Pass output_dir= to choose the folder.", file=sys.stderr, flush=True)
        elif announce:
            print(f"note: {sibling} holds the answers of this checkpoint and these settings; resuming there.",
                  file=sys.stderr, flush=True)
    ensure_writable_dir(target)
    write_key(target, key, settings)
    return target


def write_key(folder: Path, key: str, settings: Dict[str, Any]) -> None:
    if (read_key(folder) or {}).get("key") == key:
        return
    tmp = Path(folder) / f".{KEY_FILE}.{uuid.uuid4().hex}.tmp"  # unique across the ranks of a sharded run
    tmp.write_text(json.dumps({"format": KEY_FORMAT, "key": key, "settings": settings}, indent=2, sort_keys=True,
                              default=str) + "\n", encoding="utf-8")
    os.replace(tmp, Path(folder) / KEY_FILE)


def describe_difference(record: Optional[Dict[str, Any]], settings: Dict[str, Any]) -> str:
    """'with other settings (max_new_tokens: 16 → 32; model.trainable.safetensors changed)' for a key file, or why
    the folder's answers cannot be matched."""
    old = (record or {}).get("settings")
    if not isinstance(old, dict):
        return "with no record of the checkpoint and settings that made them"
    before, after = _flatten(old), _flatten(settings)
    changes = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) == after.get(name):
            continue
        if name.startswith("model."):
            what = name[len("model."):]
            changes.append(f"checkpoint file {what} changed" if what in CHECKPOINT_FILES else "model weights changed")
        elif name.endswith("sha256"):
            changes.append(f"{name[:-len('_sha256')]} content changed")
        else:
            changes.append(f"{name}: {before.get(name)!r} → {after.get(name)!r}")
    return f"with other settings ({'; '.join(changes) or 'the key differs'})"


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat
