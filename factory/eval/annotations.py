"""Readers for answer files and the benchmarks' own official annotation files (formats in docs/evaluation.md).

Every reader returns ``{question_id (as str): ground truth}`` so scorers join predictions by id. A file of the wrong
kind (e.g. a GQA file passed as VQAv2 annotations) raises FactoryError naming the file and the key that is missing.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from factory.errors import FactoryError
from factory.text_files import read_utf8


def read_json_or_jsonl(path: Path, what: str) -> Any:
    """A .json document, or a list of objects for .jsonl (one per line)."""
    return read_json_or_jsonl_lines(path, what)[0]


def read_json_or_jsonl_lines(path: Path, what: str) -> Tuple[Any, Optional[List[int]]]:
    """(document, line numbers): for JSONL, the rows and the file line of each (messages name the line); for a
    .json document, (the document, None). A file that is not UTF-8 is a FactoryError naming line and column."""
    path = Path(path)
    if not path.is_file():
        raise FactoryError(f"The {what} file {path} does not exist. Pass the path of an existing file.")
    text = read_utf8(path, "Question, answer and annotation files", _question_id_of_line)
    if path.suffix == ".jsonl" or (not text.lstrip().startswith(("[", "{")) or _looks_like_jsonl(text)):
        rows, lines = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise FactoryError(f"Line {lineno} of the {what} file {path} is not valid JSON ({err.msg}). "
                                   f"Each line of a .jsonl file must be one JSON object.") from None
            lines.append(lineno)
        return rows, lines
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        raise FactoryError(f"The {what} file {path} is not valid JSON ({err.msg} at line {err.lineno}).") from None


def _question_id_of_line(raw: bytes) -> Optional[str]:
    """"question id 'q7'" when the undecodable line is one JSON row with an id (JSONL), else None."""
    try:
        row = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    qid = row.get("question_id", row.get("id")) if isinstance(row, dict) else None
    return f"question id {qid!r}" if qid is not None else None


def _looks_like_jsonl(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith("{"):
        return False
    try:
        json.loads(lines[0])
        return True
    except json.JSONDecodeError:
        return False


def load_predictions(path: Path) -> List[Dict[str, Any]]:
    """The LLaVA answer jsonl: one object per line with ``question_id`` and ``text`` (extra keys are kept)."""
    rows = read_json_or_jsonl(path, "predictions")
    if isinstance(rows, dict):
        rows = [rows]
    seen: Dict[str, str] = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
            raise FactoryError(f"Row {i} of the predictions file {path} lacks `question_id` or `text`. Predictions "
                               f"must be the LLaVA answer jsonl ({{\"question_id\": ..., \"text\": ...}} per line).")
        qid = str(row["question_id"])
        if qid in seen and seen[qid] != str(row["text"]):
            raise FactoryError(f"question_id {qid} appears twice in the predictions file {path} with different "
                               f"answers. Merge or deduplicate the answer files before scoring.")
        seen[qid] = str(row["text"])
    unique: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(str(row["question_id"]), row)
    return list(unique.values())


def _wrong_format(path: Path, benchmark: str, expected: str) -> FactoryError:
    return FactoryError(f"The annotations file {path} is not in the {benchmark} format: expected {expected}. "
                        f"Check that --annotations points at the {benchmark} file (see docs/evaluation.md).")


def _answer_records(answers: Any, path: Path, qid: Any) -> List[Any]:
    """A question's human answer records as the file holds them (dicts with "answer", or bare strings)."""
    if not isinstance(answers, list) or not answers:
        raise FactoryError(f"Question {qid} in {path} has no human answers (`answers` is empty or missing); "
                           f"test splits without answers cannot be scored locally.")
    for record in answers:
        if isinstance(record, dict) and "answer" not in record:
            raise FactoryError(f"An answer record of question {qid} in {path} has no `answer` key ({record}). "
                               f"Human answers are strings or objects {{\"answer\": ...}}.")
    return answers


def _answer_strings(answers: Any, path: Path, qid: Any) -> List[str]:
    return [a["answer"] if isinstance(a, dict) else str(a) for a in _answer_records(answers, path, qid)]


def load_vqav2_records(path: Path) -> Dict[str, List[Any]]:
    """question_id → the annotation's answer records as written (the official scorer compares whole records)."""
    doc = read_json_or_jsonl(path, "VQAv2 annotations")
    if not isinstance(doc, dict) or "annotations" not in doc:
        raise _wrong_format(path, "vqav2", 'the official v2 annotations JSON {"annotations": [{"question_id", '
                                           '"answers": [{"answer": ...} x10]}]}')
    return {str(a["question_id"]): _answer_records(a.get("answers"), path, a.get("question_id"))
            for a in doc["annotations"]}


def load_vqav2(path: Path) -> Dict[str, List[str]]:
    return {qid: [a["answer"] if isinstance(a, dict) else str(a) for a in records]
            for qid, records in load_vqav2_records(path).items()}


def load_textvqa(path: Path) -> Dict[str, List[str]]:
    doc = read_json_or_jsonl(path, "TextVQA annotations")
    if not isinstance(doc, dict) or "data" not in doc:
        raise _wrong_format(path, "textvqa", 'the TextVQA val JSON {"data": [{"question_id", "answers": [...]}]}')
    return {str(r["question_id"]): _answer_strings(r.get("answers"), path, r.get("question_id")) for r in doc["data"]}


def load_vizwiz_records(path: Path) -> Dict[str, List[Any]]:
    """VizWiz val.json has no question ids: rows are keyed by their image file name."""
    doc = read_json_or_jsonl(path, "VizWiz annotations")
    if not isinstance(doc, list) or not doc or not isinstance(doc[0], dict) or "image" not in doc[0]:
        raise _wrong_format(path, "vizwiz", 'the VizWiz annotations list [{"image", "question", "answers": [...]}]')
    return {str(r["image"]): _answer_records(r.get("answers"), path, r.get("image")) for r in doc}


def load_vizwiz(path: Path) -> Dict[str, List[str]]:
    return {image: [a["answer"] if isinstance(a, dict) else str(a) for a in records]
            for image, records in load_vizwiz_records(path).items()}


def load_gqa_questions(path: Path) -> Dict[str, Dict[str, Any]]:
    """question id → the official question object (answer, isBalanced, types ...)."""
    doc = read_json_or_jsonl(path, "GQA questions")
    if not isinstance(doc, dict) or not doc or not all(isinstance(v, dict) and "answer" in v
                                                       for v in list(doc.values())[:50]):
        raise _wrong_format(path, "gqa", 'the official GQA questions JSON {"<question id>": {"answer": ...}}')
    return {str(qid): v for qid, v in doc.items()}


def load_gqa(path: Path) -> Dict[str, str]:
    return {qid: str(v["answer"]) for qid, v in load_gqa_questions(path).items()}


def load_labels(path: Path, benchmark: str, label_key: str = "answer") -> Dict[str, Dict[str, Any]]:
    """Generic rows with an id and a label: a list / jsonl of objects, {"data": [...]}, or {"<id>": {...}}."""
    doc = read_json_or_jsonl(path, f"{benchmark} annotations")
    if isinstance(doc, dict) and "data" in doc and isinstance(doc["data"], list):
        doc = doc["data"]
    if isinstance(doc, dict):
        rows = [dict(v, question_id=k) if isinstance(v, dict) else {"question_id": k, label_key: v}
                for k, v in doc.items()]
    else:
        rows = doc
    table: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        qid = row.get("question_id", row.get("id")) if isinstance(row, dict) else None
        if qid is None or label_key not in row:
            raise _wrong_format(path, benchmark, f'rows with "question_id" (or "id") and "{label_key}"')
        table[str(qid)] = row
    return table


def load_pope(path: Path) -> Dict[str, Dict[str, Any]]:
    """coco_pope rows {question_id, label: yes|no}; a folder of coco_pope_<split>.json(l) files sets each split."""
    path = Path(path)
    if not path.is_dir():
        table = load_labels(path, "pope", "label")
        for row in table.values():
            row.setdefault("category", row.get("category") or "all")
        return table
    table: Dict[str, Dict[str, Any]] = {}
    files = sorted(p for p in path.iterdir() if p.name.startswith("coco_pope_") and p.suffix in (".json", ".jsonl"))
    if not files:
        raise FactoryError(f"The POPE annotations folder {path} has no coco_pope_<split>.json files. Pass one such "
                           f"file or the folder holding coco_pope_random/popular/adversarial.json.")
    for file in files:
        split = file.stem[len("coco_pope_"):]
        for qid, row in load_labels(file, "pope", "label").items():
            if qid in table:
                raise FactoryError(f"question_id {qid} appears in several POPE split files under {path}; the "
                                   f"splits cannot be told apart by id. Score each split file separately.")
            table[qid] = dict(row, category=split)
    return table


def load_sqa(path: Path) -> Dict[str, Dict[str, Any]]:
    doc = read_json_or_jsonl(path, "ScienceQA problems")
    if not isinstance(doc, dict) or not all(isinstance(v, dict) and "choices" in v and "answer" in v
                                            for v in list(doc.values())[:50]):
        raise _wrong_format(path, "sqa", 'ScienceQA problems.json {"<pid>": {"question", "choices": [...], '
                                         '"answer": <index>, "image"}}')
    return {str(pid): v for pid, v in doc.items()}


@dataclass
class Joined:
    """Predictions matched with their ground truth, plus the counts of everything that could not be matched."""

    pairs: List[Tuple[Dict[str, Any], Any]]
    skipped_unknown_id: int = 0
    unanswered: int = 0
    empty_predictions: int = 0
    examples_unknown: List[str] = field(default_factory=list)

    def report(self) -> Dict[str, int]:
        return {"n": len(self.pairs), "skipped_unknown_id": self.skipped_unknown_id,
                "unanswered": self.unanswered, "empty_predictions": self.empty_predictions}


def join(predictions: List[Dict[str, Any]], truth: Dict[str, Any], benchmark: str, annotations: Path,
         key: str = "question_id", strict: bool = False) -> Joined:
    """Match predictions to ground truth by ``key``. Unknown ids are skipped, counted and reported on stderr;
    if none match at all (the wrong file) or ``strict`` is set, raise FactoryError instead."""
    joined = Joined(pairs=[])
    for row in predictions:
        k = str(row.get(key, "")) if key != "question_id" else str(row["question_id"])
        if k not in truth:
            joined.skipped_unknown_id += 1
            if len(joined.examples_unknown) < 3:
                joined.examples_unknown.append(k)
            continue
        if not str(row["text"]).strip():
            joined.empty_predictions += 1  # an empty answer is scored (as wrong), not dropped
        joined.pairs.append((row, truth[k]))
    joined.unanswered = len(truth) - len(joined.pairs)
    if predictions and not joined.pairs:
        raise FactoryError(f"None of the {len(predictions)} predictions matches an entry of the {benchmark} "
                           f"annotations {annotations} by {key} (e.g. {joined.examples_unknown}). The predictions "
                           f"and the annotations belong to different benchmarks or splits.")
    if joined.skipped_unknown_id:
        message = (f"{joined.skipped_unknown_id} prediction(s) have a {key} that is not in {annotations} "
                   f"(e.g. {joined.examples_unknown}); they are skipped and reported as skipped_unknown_id.")
        if strict:
            raise FactoryError(message + " Remove them or run without --strict.")
        print(f"warning: {message}", file=sys.stderr)
    return joined


def optional_questions(path: Optional[Path]) -> Dict[str, Dict[str, Any]]:
    """question_id → question row, from a LLaVA question file (used to recover image names / POPE categories)."""
    if path is None:
        return {}
    rows = read_json_or_jsonl(path, "questions")
    if isinstance(rows, dict):
        rows = list(rows.values())
    return {str(r.get("question_id", r.get("id"))): r for r in rows if isinstance(r, dict)}


def attach_from_questions(predictions: List[Dict[str, Any]], questions: Optional[Path], key: str,
                          name: str) -> List[Dict[str, Any]]:
    """Answer rows written by eval.py carry the image name; foreign answer files may need the question file."""
    if all(key in row for row in predictions):
        return predictions
    by_id = optional_questions(questions)
    if not by_id:
        raise FactoryError(f"{name} annotations are keyed by `{key}`, which the predictions lack. Pass the question "
                           f"file with --questions so each question_id can be mapped to its {key}.")
    out = []
    for row in predictions:
        q = by_id.get(str(row["question_id"]), {})
        out.append(dict(row, **{key: q[key]}) if key in q else row)
    return out
