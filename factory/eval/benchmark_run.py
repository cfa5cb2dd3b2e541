"""Run a benchmark: answers jsonl (resumable, sharded by RANK/WORLD_SIZE) → merged answers → score → results JSON.

Layout under ``output_dir`` (default ``<checkpoint>/eval/<benchmark>/``):

* ``answers.part<rank>.jsonl`` — each rank appends its answers batch by batch (flushed), so an interrupted run loses
  at most one batch. On restart every part file is read and the question_ids already answered are skipped, whatever
  the number of processes was before.
* ``answers.jsonl`` — rank 0 merges the parts in question-file order once every question is answered (LLaVA answer
  format: question_id, prompt, text, answer_id, model_id, metadata, + image/category when the question has them).
* ``results.json`` — metrics, counts, timing and the evaluation config (+ the checkpoint's config.yaml).
* ``cache_key.json`` — the checkpoint identity and generation settings the answers were made with
  (factory.eval.output_folder): answers are resumed only under the same key; a folder holding answers made
  otherwise is left untouched and the run goes to ``<output_dir>-<key prefix>`` instead.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tqdm import tqdm

from factory.distributed import launcher_world
from factory.errors import FactoryError
from factory.eval.annotations import load_predictions
from factory.eval.benchmarks import get_benchmark, score_and_export
from factory.eval.generate import (Question, answer_questions, batched, check_image_paths, load_questions,
                                   missing_images)
from factory.eval.official import DEFAULT_SEED, check_protocol
from factory.eval.output_folder import generation_settings, keyed_output_dir, settings_key, write_error

PART_PREFIX = "answers.part"
EXTRA_KEYS = ("image", "category", "question_type")


def read_answer_parts(output_dir: Path) -> Dict[str, Dict[str, Any]]:
    """question_id → answer row, from every part file. A torn last line (killed mid-write) is ignored."""
    answered: Dict[str, Dict[str, Any]] = {}
    for part in sorted(Path(output_dir).glob(f"{PART_PREFIX}*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "question_id" in row:
                answered[str(row["question_id"])] = row
    return answered


def drop_torn_tail(part: Path) -> None:
    """Cut a partial last line (the process was killed mid-write) so appended answers start on a fresh line."""
    if not part.is_file():
        return
    data = part.read_bytes()
    if data and not data.endswith(b"\n"):
        part.write_bytes(data[: data.rfind(b"\n") + 1])


def answer_row(question: Question, text: str, model_id: str) -> Dict[str, Any]:
    row = {"question_id": question["question_id"], "prompt": question["text"], "text": text,
           "answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}}
    row.update({k: question[k] for k in EXTRA_KEYS if question.get(k) is not None})
    return row


def generate_shard(model, questions: Sequence[Question], image_folder: Optional[Path], output_dir: Path,
                   rank: int, world_size: int, batch_size: int, max_new_tokens: int, model_id: str,
                   progress: bool = True) -> int:
    """Answer this rank's share of the not-yet-answered questions; returns how many it generated."""
    done = read_answer_parts(output_dir)
    todo = [q for i, q in enumerate(questions) if i % world_size == rank and str(q["question_id"]) not in done]
    part = Path(output_dir) / f"{PART_PREFIX}{rank}.jsonl"
    drop_torn_tail(part)
    chunks = batched(todo, batch_size)
    if progress and todo:
        chunks = tqdm(chunks, total=-(-len(todo) // batch_size), desc=f"answering (rank {rank})", unit="batch",
                      disable=rank != 0 and world_size > 1)
    with part.open("a", encoding="utf-8") as sink:
        for chunk in chunks:
            texts = answer_questions(model, chunk, image_folder, max_new_tokens)
            for question, text in zip(chunk, texts):
                sink.write(json.dumps(answer_row(question, text, model_id)) + "\n")
            sink.flush()
    return len(todo)


def merge_answers(questions: Sequence[Question], output_dir: Path, wait_s: float = 0.0,
                  poll_s: float = 1.0) -> Path:
    """Write answers.jsonl in question order once every question has an answer (waiting up to `wait_s` for the
    other ranks). Missing answers after the wait → FactoryError (rerun to resume)."""
    deadline = time.monotonic() + wait_s
    while True:
        answered = read_answer_parts(output_dir)
        missing = [q["question_id"] for q in questions if str(q["question_id"]) not in answered]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if missing:
        raise FactoryError(f"{len(missing)} question(s) have no answer in {output_dir} (e.g. {missing[:3]}): a "
                           f"process stopped early. Run the same command again; answered questions are skipped.")
    out = Path(output_dir) / "answers.jsonl"
    _note_replaced_selection(out, [str(q["question_id"]) for q in questions])
    tmp = out.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as sink:
        for q in questions:
            sink.write(json.dumps(answered[str(q["question_id"])]) + "\n")
    os.replace(tmp, out)
    return out


def _note_replaced_selection(answers: Path, question_ids: List[str]) -> None:
    """answers.jsonl is the merge of the part files for this run's questions; say so when it replaces a merge of
    another selection (e.g. limit= changed): the answers themselves stay in the part files."""
    if not answers.is_file():
        return
    old = []
    for line in answers.read_text(encoding="utf-8").splitlines():
        try:
            old.append(str(json.loads(line)["question_id"]))
        except (ValueError, KeyError, TypeError):
            continue
    if old != question_ids:
        print(f"note: {answers} held {len(old)} answers; it now lists the {len(question_ids)} questions of this run "
              f"(results.json too). Every answer stays in {PART_PREFIX}*.jsonl, so running the earlier selection "
              "again rebuilds it without generating.", file=sys.stderr, flush=True)


def select_questions(question_file: Path, image_folder: Optional[Path], limit: Optional[int],
                     skip_missing_images: bool, allow_outside_paths: bool = False) -> tuple:
    """The questions to answer, and how many were dropped for a missing image (only with skip_missing_images).
    Every image path must lie inside `image_folder` unless `allow_outside_paths`."""
    questions = load_questions(Path(question_file))
    check_image_paths(questions, image_folder, allow_outside_paths)
    if limit is not None:
        questions = questions[: int(limit)]
    missing = set(missing_images(questions, image_folder))
    if missing and not skip_missing_images:
        raise FactoryError(f"{len(missing)} image(s) named in {question_file} are not under {image_folder} (e.g. "
                           f"{sorted(missing)[:3]}). Fix image_folder, or set skip_missing_images=true to skip "
                           f"those questions (they are counted in results.json).")
    kept = [q for q in questions if not (q.get("image") and str(q["image"]) in missing)]
    return kept, len(questions) - len(kept)


def run_benchmark(model, benchmark: str, question_file: Path, output_dir: Path, image_folder: Optional[Path] = None,
                  annotations: Optional[Path] = None, batch_size: int = 8, max_new_tokens: Optional[int] = None,
                  limit: Optional[int] = None, model_id: str = "model", skip_missing_images: bool = False,
                  submission_questions: Optional[Path] = None, config: Optional[Dict[str, Any]] = None,
                  merge_wait_s: float = 3600.0, progress: bool = True,
                  identity: Optional[Dict[str, str]] = None, protocol: str = "official",
                  seed: Optional[int] = None, allow_outside_paths: bool = False) -> Optional[Dict[str, Any]]:
    """Generate (this rank's shard), then on rank 0 merge, score / export and write results.json (returned).

    `identity`: what the model is, for the answer cache (eval.py passes the checkpoint's file hashes); None →
    a fingerprint of the model's config and trained weights. The answers go to `output_dir`, or to its keyed
    sibling when `output_dir` holds answers made with another model or other settings (factory.eval.output_folder);
    `result["output_dir"]` says which. `seed`: the MMMU official scorer's random fallback (None: its default, 42);
    recorded in results.json."""
    try:
        return _run_benchmark(model, benchmark, question_file, output_dir, image_folder, annotations, batch_size,
                              max_new_tokens, limit, model_id, skip_missing_images, submission_questions, config,
                              merge_wait_s, progress, identity, protocol, seed,
                              allow_outside_paths)
    except OSError as err:  # disk full / read-only / permissions while writing answers or results
        explained = write_error(err, Path(output_dir))
        if explained is None:
            raise
        raise explained from None


def _run_benchmark(model, benchmark, question_file, output_dir, image_folder, annotations, batch_size,
                   max_new_tokens, limit, model_id, skip_missing_images, submission_questions, config,
                   merge_wait_s, progress, identity, protocol="official", seed=None,
                   allow_outside_paths=False):
    bench = get_benchmark(benchmark)
    check_protocol(protocol)  # before generating, not after
    rank, world = launcher_world()
    questions, skipped = select_questions(question_file, image_folder, limit, skip_missing_images, allow_outside_paths)
    if not questions:
        raise FactoryError(f"No questions to answer in {question_file} (limit={limit}).")
    max_new_tokens = int(max_new_tokens or bench.max_new_tokens)
    settings = generation_settings(model, benchmark, Path(question_file), image_folder, max_new_tokens, identity,
                                   probe_question=questions[0])
    output_dir = keyed_output_dir(Path(output_dir), settings, announce=rank == 0)
    start = time.perf_counter()
    generated = generate_shard(model, questions, image_folder, output_dir, rank, world, batch_size, max_new_tokens,
                               model_id, progress)
    seconds = time.perf_counter() - start
    if rank != 0:
        return None
    answers = merge_answers(questions, output_dir, wait_s=merge_wait_s if world > 1 else 0.0)
    result: Dict[str, Any] = {"benchmark": benchmark, "answers": str(answers), "output_dir": str(output_dir),
                              "cache_key": settings_key(settings), "n_questions": len(questions),
                              "skipped_missing_image": skipped, "generated_this_run": generated,
                              "generation_seconds_rank0": round(seconds, 3)}
    if generated:
        result["seconds_per_100"] = round(100.0 * seconds / generated, 3)
    if annotations is None and bench.answers_in_questions:
        annotations = Path(question_file)
    rows = load_predictions(answers)
    seed = DEFAULT_SEED if seed is None else int(seed)
    result.update(score_and_export(bench, rows, output_dir, annotations, Path(question_file), submission_questions,
                                   protocol, seed))  # "protocol" (official | lenient), "submission", "metrics"
    result["seed"] = seed
    result["config"] = config or {}
    (output_dir / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    return result
