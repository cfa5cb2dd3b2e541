"""The BENCHMARKS registry: for each benchmark name, how to score an answer file and what to export.

A `Benchmark` bundles two scorers ``score(predictions, annotations, questions, strict) -> metrics`` — ``official``
(factory/eval/official/: the benchmark's own evaluation code, bit for bit; the default protocol) and ``score`` (the
factory's lenient rules of factory/eval/answer_metrics.py) — None when the benchmark is judged elsewhere (MM-Vet by
GPT-4), the matching exporters of the submission file, and generation defaults. `score_answers` / `export_answers`
pick by protocol. Metrics are percentages (0..100) plus ``n`` and the skip counts of `annotations.join`.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from factory.errors import FactoryError
from factory.eval import annotations as ann
from factory.eval import answer_metrics, official
from factory.eval.official import exports as official_exports
from factory.eval.official import scorers as official_scorers
from factory.registry import BENCHMARKS

Rows = List[Dict[str, Any]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    score: Optional[Callable[..., Dict[str, Any]]]
    export: Optional[Callable[[Rows, Path, Optional[Path]], Path]] = None
    max_new_tokens: int = 16
    description: str = ""
    # True when the question file itself holds the gold answers (micro-world): it doubles as the annotations.
    answers_in_questions: bool = False
    # The `official` protocol's scorer and exporter (None: no official counterpart, the lenient one is used).
    official: Optional[Callable[..., Dict[str, Any]]] = None
    official_export: Optional[Callable[[Rows, Path, Optional[Path]], Path]] = None
    # True when the official scorer guesses at random for unparsable answers (MMMU): it takes the `seed`.
    seeded: bool = False

    def scorer(self, protocol: str) -> Optional[Callable[..., Dict[str, Any]]]:
        return self.official or self.score if official.check_protocol(protocol) == "official" else self.score

    def exporter(self, protocol: str) -> Optional[Callable[[Rows, Path, Optional[Path]], Path]]:
        return (self.official_export or self.export if official.check_protocol(protocol) == "official"
                else self.export)


def score_answers(bench: Benchmark, predictions: Rows, annotations: Path, questions: Optional[Path] = None,
                  strict: bool = False, protocol: str = official.DEFAULT_PROTOCOL,
                  seed: int = official.DEFAULT_SEED) -> Dict[str, Any]:
    """The metrics of `predictions` under `protocol`, with ``"protocol"`` recorded in them."""
    score = bench.scorer(protocol)
    if score is None:
        raise FactoryError(f"Benchmark {bench.name!r} is not scored locally (it is judged by its own service); "
                           f"export the official answer file instead.")
    extra = {"seed": seed} if bench.seeded and protocol == "official" else {}
    return {**score(predictions, annotations, questions, strict, **extra), "protocol": protocol}


def export_answers(bench: Benchmark, predictions: Rows, out_dir: Path, questions: Optional[Path] = None,
                   protocol: str = official.DEFAULT_PROTOCOL) -> Path:
    export = bench.exporter(protocol)
    if export is None:
        raise FactoryError(f"Benchmark {bench.name!r} has no official submission format to export (exporting exists "
                           f"for vqav2, vizwiz and mmvet).")
    return export(predictions, out_dir, questions)


def score_and_export(bench: Benchmark, predictions: Rows, out_dir: Path, annotations: Optional[Path],
                     questions: Optional[Path], submission_questions: Optional[Path],
                     protocol: str = official.DEFAULT_PROTOCOL, seed: int = official.DEFAULT_SEED) -> Dict[str, Any]:
    """What eval.py adds to results.json: the protocol, the submission file (when the benchmark has one) and the
    metrics (when there are annotations and the benchmark is scored locally; `seed` goes to a seeded scorer)."""
    out: Dict[str, Any] = {"protocol": official.check_protocol(protocol)}
    if bench.exporter(protocol) is not None:
        out["submission"] = str(export_answers(bench, predictions, out_dir, submission_questions, protocol))
    if annotations is not None and bench.scorer(protocol) is not None:
        out["metrics"] = score_answers(bench, predictions, Path(annotations), questions, False, protocol, seed)
    return out


def _vqa_scorer(loader: Callable[[Path], Dict[str, List[str]]], protocol: str, name: str, key: str = "question_id"):
    def score(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
        truth = loader(annotations)
        if key != "question_id":
            predictions = ann.attach_from_questions(predictions, questions, key, name)
        joined = ann.join(predictions, truth, name, annotations, key=key, strict=strict)
        accs = [answer_metrics.vqa_accuracy(row["text"], answers, protocol) for row, answers in joined.pairs]
        return {"accuracy": answer_metrics.mean_percent(accs), **joined.report()}
    return score


def score_gqa(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    joined = ann.join(predictions, ann.load_gqa(annotations), "gqa", annotations, strict=strict)
    correct = [answer_metrics.gqa_correct(row["text"], answer) for row, answer in joined.pairs]
    return {"accuracy": answer_metrics.mean_percent(correct), **joined.report()}


def score_iconqa(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    truth = ann.load_labels(annotations, "iconqa", "answer")
    joined = ann.join(predictions, truth, "iconqa", annotations, strict=strict)
    correct = [answer_metrics.iconqa_correct(row["text"], gt["answer"]) for row, gt in joined.pairs]
    return {"accuracy": answer_metrics.mean_percent(correct), **joined.report()}


def score_pope(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    truth = ann.load_pope(annotations)
    for qid, row in truth.items():
        if str(row["label"]).strip().lower() not in ("yes", "no"):
            raise FactoryError(f"POPE label of question {qid} in {annotations} is {row['label']!r}; labels must "
                               f"be 'yes' or 'no'.")
    joined = ann.join(predictions, truth, "pope", annotations, strict=strict)
    several_splits = len({row.get("category", "all") for row in truth.values()}) > 1
    by_split: Dict[str, List[tuple]] = defaultdict(list)
    for row, gt in joined.pairs:
        pair = (answer_metrics.parse_yes_no(row["text"]), str(gt["label"]).strip().lower())
        by_split[gt.get("category", "all")].append(pair)
        if several_splits:
            by_split["all"].append(pair)
    result: Dict[str, Any] = {}
    for split, pairs in sorted(by_split.items()):
        result[split] = answer_metrics.binary_metrics([p for p, _ in pairs], [l for _, l in pairs])
    overall = result["all"] if "all" in result else next(iter(result.values()))
    # Top-level keys are the overall numbers so the CLI's one-line output reads like every other benchmark's.
    return {**{k: overall[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")},
            "splits": {k: v for k, v in result.items() if k != "all"} or None, **joined.report()}


def score_sqa(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    """ScienceQA: predictions keyed by pid; letter parsed; unparsable = wrong. `img_accuracy` = image questions."""
    joined = ann.join(predictions, ann.load_sqa(annotations), "sqa", annotations, strict=strict)
    correct, correct_img, unparsable = [], [], 0
    for row, problem in joined.pairs:
        index = answer_metrics.parse_option_letter(row["text"], len(problem["choices"]))
        unparsable += index is None
        ok = index is not None and index == int(problem["answer"])
        correct.append(ok)
        if problem.get("image"):
            correct_img.append(ok)
    return {"accuracy": answer_metrics.mean_percent(correct), "img_accuracy": answer_metrics.mean_percent(correct_img),
            "n_img": len(correct_img), "unparsable": unparsable, **joined.report()}


def score_mmmu(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    """MMMU: rows {question_id, answer, options?, question_type?}; multiple-choice answers are letters."""
    joined = ann.join(predictions, ann.load_labels(annotations, "mmmu", "answer"), "mmmu", annotations,
                      strict=strict)
    correct, unparsable = [], 0
    for row, gt in joined.pairs:
        options = gt.get("options")
        if isinstance(options, str):  # the HF dataset stores options as a Python-literal string
            options = json.loads(options.replace("'", '"')) if options.strip().startswith("[") else None
        if gt.get("question_type", "multiple-choice") == "multiple-choice" and options:
            index = answer_metrics.parse_mmmu_choice(row["text"], options)
            unparsable += index is None
            correct.append(index is not None and answer_metrics.OPTION_LETTERS[index] == str(gt["answer"]).strip())
        else:  # open questions: exact match after light normalisation
            correct.append(answer_metrics.normalize_gqa_answer(row["text"])
                           == answer_metrics.normalize_gqa_answer(gt["answer"]))
    return {"accuracy": answer_metrics.mean_percent(correct), "unparsable": unparsable, **joined.report()}


def export_vqav2(predictions: Rows, out_dir: Path, test_questions: Optional[Path] = None) -> Path:
    """EvalAI test-dev submission: [{"question_id": int, "answer": normalised}], every test question present
    (unanswered ones get "" so the server accepts the file; their count is printed)."""
    answers = {str(r["question_id"]): answer_metrics.normalize_vqa_answer(r["text"]) for r in predictions}
    ids = list(answers)
    if test_questions is not None:
        doc = ann.read_json_or_jsonl(test_questions, "VQAv2 test questions")
        rows = doc.get("questions", []) if isinstance(doc, dict) else doc
        ids = [str(q["question_id"]) for q in rows]
        missing = sum(1 for i in ids if i not in answers)
        if missing:
            print(f"warning: {missing} test question(s) have no prediction; submitted as empty answers")
    out = Path(out_dir) / "vqav2_test-dev_submission.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"question_id": int(i) if i.isdigit() else i, "answer": answers.get(i, "")}
                               for i in ids]))
    return out


def export_mmvet(predictions: Rows, out_dir: Path, test_questions: Optional[Path] = None) -> Path:
    """MM-Vet's evaluator reads {"v1_<id>": answer}."""
    result = {}
    for r in predictions:
        qid = str(r["question_id"])
        result[qid if qid.startswith("v1_") else f"v1_{qid}"] = r["text"]
    out = Path(out_dir) / "mmvet_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def export_vizwiz(predictions: Rows, out_dir: Path, test_questions: Optional[Path] = None) -> Path:
    """VizWiz server submission: [{"image": name, "answer": normalised}]."""
    predictions = ann.attach_from_questions(predictions, test_questions, "image", "vizwiz")
    out = Path(out_dir) / "vizwiz_submission.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"image": r.get("image"), "answer": answer_metrics.normalize_vqa_answer(r["text"])}
                               for r in predictions]))
    return out


def score_microworld(predictions: Rows, annotations: Path, questions: Optional[Path] = None, strict: bool = False):
    from factory.eval.microworld import score_microworld as score  # imports torch: only when needed

    return score(predictions, annotations, questions, strict)


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark `name` (FactoryError listing the known ones otherwise)."""
    return BENCHMARKS.get(name)


_off = official_scorers
for _benchmark in (
    Benchmark("vqav2", _vqa_scorer(ann.load_vqav2, "vqa", "vqav2"), export_vqav2, 16, "VQAv2 (VQA accuracy)",
              official=_off.score_vqav2, official_export=official_exports.export_vqav2),
    Benchmark("textvqa", _vqa_scorer(ann.load_textvqa, "textvqa", "textvqa"), None, 16, "TextVQA (VQA accuracy)",
              official=_off.score_textvqa),
    Benchmark("vizwiz", _vqa_scorer(ann.load_vizwiz, "vqa", "vizwiz", key="image"), export_vizwiz, 16,
              "VizWiz (VQA accuracy, joined by image name)", official=_off.score_vizwiz,
              official_export=official_exports.export_vizwiz),
    Benchmark("gqa", score_gqa, None, 16, "GQA testdev-balanced (exact match)", official=_off.score_gqa),
    Benchmark("pope", score_pope, None, 16, "POPE random/popular/adversarial (yes/no)", official=_off.score_pope),
    Benchmark("sqa", score_sqa, None, 16, "ScienceQA-IMG (option letter)", official=_off.score_sqa),
    Benchmark("mmmu", score_mmmu, None, 64, "MMMU (multiple choice)", official=_off.score_mmmu, seeded=True),
    Benchmark("iconqa", score_iconqa, None, 16, "IconQA (exact match)", official=_off.score_iconqa),
    Benchmark("mmvet", None, export_mmvet, 512, "MM-Vet (GPT-4 judged: export only)",
              official_export=official_exports.export_mmvet),
    # The micro-world is the factory's own benchmark: there is no other code to follow, one scorer serves both.
    Benchmark("microworld", score_microworld, None, 8, "micro-world held-out split (exact match per type + POPE)",
              answers_in_questions=True),
):
    BENCHMARKS.register(_benchmark.name)(_benchmark)
