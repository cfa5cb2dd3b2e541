"""The command that scores an answer file without a model (the metrics themselves: answer_metrics.py and official/):
``python -m factory.eval.score --benchmark vqav2 --predictions answers.jsonl
--annotations v2_mscoco_val2014_annotations.json`` (``--protocol official``, the default, reproduces the benchmark's
official evaluation code; ``--protocol lenient`` uses the factory's friendlier answer parsing).

Prints ONE JSON object with the metrics on the last line of stdout (warnings go to stderr), so scripts can read it
with ``tail -n 1``. Exit code 2 with a one-paragraph message on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from factory.errors import FactoryError
from factory.eval.annotations import load_predictions
from factory.eval.benchmarks import export_answers, get_benchmark, score_answers
from factory.eval.official import DEFAULT_PROTOCOL, DEFAULT_SEED, PROTOCOLS, check_protocol


def score_file(benchmark: str, predictions: Path, annotations: Optional[Path] = None,
               questions: Optional[Path] = None, submission_dir: Optional[Path] = None,
               strict: bool = False, protocol: str = DEFAULT_PROTOCOL, seed: int = DEFAULT_SEED) -> Dict[str, Any]:
    """Score (and/or export) one answer file; returns the metrics dict the CLI prints (with ``protocol``)."""
    check_protocol(protocol)
    bench = get_benchmark(benchmark)
    rows = load_predictions(Path(predictions))
    if not rows:
        raise FactoryError(f"The predictions file {predictions} is empty; there is nothing to score.")
    result: Dict[str, Any] = {"benchmark": benchmark, "protocol": protocol}
    if submission_dir is not None:
        if bench.exporter(protocol) is None:
            raise FactoryError(f"Benchmark {benchmark!r} has no official submission format to export; drop "
                               f"--submission-dir (exporting exists for vqav2, vizwiz and mmvet).")
        result["submission"] = str(export_answers(bench, rows, Path(submission_dir), questions, protocol))
    if annotations is not None:
        if bench.scorer(protocol) is None:
            raise FactoryError(f"Benchmark {benchmark!r} is not scored locally (it is judged by its own service); "
                               f"use --submission-dir to export the official answer file instead.")
        result.update(score_answers(bench, rows, Path(annotations), Path(questions) if questions else None, strict,
                                    protocol, seed))
    elif submission_dir is None:
        raise FactoryError(f"Nothing to do for {benchmark!r}: pass --annotations to score locally"
                           f"{' or --submission-dir to export' if bench.export else ''}.")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m factory.eval.score",
                                     description="Score (or export) an answer file without a model.")
    parser.add_argument("--benchmark", required=True,
                        help="vqav2 | textvqa | vizwiz | gqa | pope | sqa | mmmu | iconqa | mmvet")
    parser.add_argument("--predictions", required=True, type=Path, help="LLaVA answer jsonl (question_id, text)")
    parser.add_argument("--annotations", type=Path, help="the benchmark's official annotation file (or POPE folder)")
    parser.add_argument("--questions", type=Path,
                        help="LLaVA question file; needed when the answers lack keys the annotations use (VizWiz image)")
    parser.add_argument("--submission-dir", type=Path,
                        help="write the official submission file here (vqav2 EvalAI test-dev, vizwiz, mmvet); for "
                             "vqav2 pass the official test-dev questions JSON as --questions to include every id")
    parser.add_argument("--strict", action="store_true", help="fail instead of skipping unknown question ids")
    parser.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=PROTOCOLS,
                        help="official (default): the benchmark's own evaluation code, bit for bit; lenient: the "
                             "factory's friendlier answer parsing (docs/evaluation.md)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of MMMU's random guess for unparsable answers (official protocol; recorded)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = score_file(args.benchmark, args.predictions, args.annotations, args.questions,
                            args.submission_dir, args.strict, args.protocol, args.seed)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
