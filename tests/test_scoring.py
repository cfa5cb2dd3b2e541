"""The `lenient` protocol's scorers on hand-made cases: every VQA normalisation rule, leave-one-out accuracy, GQA, POPE
metrics on a known confusion matrix, ScienceQA / MMMU letter parsing, and the scorer CLI on small files (incl. bad
input). The `official` protocol (the default) is tested in tests/test_official_scoring.py."""
import json
import subprocess
import sys

import pytest

from factory.errors import FactoryError
from factory.eval import answer_metrics
from factory.eval.score import main as score_main
from factory.eval.score import score_file


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"),                          # lower-case
    ("  two\n", "2"),                        # whitespace + number word → digit
    ("None", "0"),                           # "none" counts as zero
    ("ten apples", "10 apples"),
    ("the dog", "dog"), ("a cat", "cat"), ("an apple", "apple"),   # articles
    ("dont", "don't"), ("isnt", "isn't"), ("couldntve", "couldn't've"), ("couldnt've", "couldn't've"),  # contractions
    ("its", "its"), ("well", "well"),       # ordinary words are not turned into contractions
    ("black-and-white", "black and white"),  # punctuation between words → space
    ("yes !", "yes"),                         # punctuation touching a space → removed
    ("2,000", "2000"),                        # digit,digit → comma removed (and all punctuation deleted)
    ("3.5", "3.5"), ("end.", "end"), ("1.", "1"),   # periods kept only before a digit
    ("it's", "it's"), ("3:30", "3:30"),     # apostrophe and colon survive
    ("(red)", "red"), ("red/blue", "red blue"),
])
def test_vqa_normalisation_rules(raw, expected):
    assert answer_metrics.normalize_vqa_answer(raw) == expected


def test_leave_one_out_accuracy_values():
    ten = lambda k, a="2", b="3": [a] * k + [b] * (10 - k)  # noqa: E731
    assert answer_metrics.leave_one_out_accuracy("2", ten(0)) == 0.0
    assert answer_metrics.leave_one_out_accuracy("2", ten(1)) == pytest.approx(0.3)     # 9 subsets see 1 match: 1/3
    assert answer_metrics.leave_one_out_accuracy("2", ten(2)) == pytest.approx(0.6)
    assert answer_metrics.leave_one_out_accuracy("2", ten(3)) == pytest.approx(0.9)
    assert answer_metrics.leave_one_out_accuracy("2", ten(4)) == pytest.approx(1.0)


def test_vqa_accuracy_protocols():
    assert answer_metrics.vqa_accuracy("Two.", ["2"] * 10) == 1.0                # prediction always normalised
    assert answer_metrics.vqa_accuracy("dog", ["the dog"] * 10, "vqa") == 0.0    # unanimous humans are taken verbatim
    assert answer_metrics.vqa_accuracy("dog", ["the dog"] * 10, "textvqa") == 1.0  # TextVQA normalises both sides
    # annotators disagree → punctuation-normalised human answers
    assert answer_metrics.vqa_accuracy("hot dog", ["hot-dog"] * 3 + ["pizza"] * 7, "vqa") == pytest.approx(0.9)
    assert answer_metrics.vqa_accuracy("man's hat", ["man's hat"] * 10, "textvqa") == 1.0
    with pytest.raises(ValueError):
        answer_metrics.vqa_accuracy("x", ["x"], "coco")


def test_gqa_and_iconqa():
    assert answer_metrics.gqa_correct("Yes.", "yes") and answer_metrics.gqa_correct(" left ", "left")
    assert not answer_metrics.gqa_correct("the left", "left")
    assert answer_metrics.iconqa_correct(" 3 \n", "3") and not answer_metrics.iconqa_correct("3.", "3")


@pytest.mark.parametrize("text, index", [
    ("B", 1), ("B.", 1), ("(B)", 1), ("B. The sun", 1), ("The answer is B.", 1), ("the answer is C", 2),
    ("A", 0), ("E", None), ("I think so", None), ("", None), ("b", None), ("The answer is unclear", None),
])
def test_sqa_letter_parsing(text, index):
    assert answer_metrics.parse_option_letter(text, num_choices=4) == index


def test_mmmu_choice_parsing():
    options = ["cat", "dog", "bird", "fish"]
    assert answer_metrics.parse_mmmu_choice("(C)", options) == 2
    assert answer_metrics.parse_mmmu_choice("B", options) == 1
    assert answer_metrics.parse_mmmu_choice("A is wrong, so the answer is D.", options) == 3  # last mention wins
    assert answer_metrics.parse_mmmu_choice("I believe the animal in the picture is a dog", options) == 1
    assert answer_metrics.parse_mmmu_choice("no idea", options) is None


@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a dog.", "yes"), ("No, there is not.", "no"), ("There is not a cat", "no"),
    ("Yes. No dog is there.", "yes"),   # only the first sentence counts
    ("no,", "no"), ("Nope", "yes"),     # commas dropped; only the words no/not
])
def test_pope_parsing(text, parsed):
    assert answer_metrics.parse_yes_no(text) == parsed


def test_binary_metrics_known_confusion_matrix():
    # TP=3, FP=1, TN=4, FN=2 → precision 3/4, recall 3/5, F1 2/3, accuracy 7/10, yes-ratio 4/10
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    m = answer_metrics.binary_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 4, 2)
    assert m["accuracy"] == pytest.approx(70.0) and m["precision"] == pytest.approx(75.0)
    assert m["recall"] == pytest.approx(60.0) and m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(40.0)


# ------------------------------------------------------------------------------------------------ files + CLI
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_vqav2_prints_one_json_line_and_writes_submission(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "2"}] * 10},
        {"question_id": 2, "answers": [{"answer": "red"}] * 2 + [{"answer": "blue"}] * 8},
    ]}))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "Two"}, {"question_id": 2, "text": "red"}])
    assert score_main(["--benchmark", "vqav2", "--predictions", str(preds), "--annotations", str(ann),
                       "--submission-dir", str(tmp_path / "sub"), "--protocol", "lenient"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == pytest.approx((1.0 + 0.6) / 2 * 100) and result["n"] == 2
    assert result["protocol"] == "lenient"
    submission = json.loads((tmp_path / "sub" / "vqav2_test-dev_submission.json").read_text())
    assert submission == [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "red"}]


def test_cli_as_module_subprocess(tmp_path):
    ann = tmp_path / "gqa.json"
    ann.write_text(json.dumps({"q1": {"answer": "left"}, "q2": {"answer": "yes"}}))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": "q1", "text": "Left."}, {"question_id": "q2", "text": "no"}])
    out = subprocess.run([sys.executable, "-m", "factory.eval.score", "--benchmark", "gqa", "--predictions",
                          str(preds), "--annotations", str(ann), "--protocol", "lenient"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(50.0)


def test_textvqa_pope_sqa_files(tmp_path):
    tv = tmp_path / "textvqa.json"
    tv.write_text(json.dumps({"data": [{"question_id": 7, "answers": ["Coca Cola"] * 10}]}))
    preds = _jsonl(tmp_path / "tv.jsonl", [{"question_id": 7, "text": "coca-cola"}])
    assert score_file("textvqa", preds, tv, protocol="lenient")["accuracy"] == pytest.approx(100.0)

    pope_dir = tmp_path / "pope"
    pope_dir.mkdir()
    _jsonl(pope_dir / "coco_pope_random.json", [{"question_id": 1, "label": "yes"}, {"question_id": 2, "label": "no"}])
    _jsonl(pope_dir / "coco_pope_adversarial.json", [{"question_id": 3, "label": "no"}, {"question_id": 4, "label": "yes"}])
    preds = _jsonl(tmp_path / "pope.jsonl", [{"question_id": i, "text": t} for i, t in
                                             [(1, "Yes."), (2, "No, there is not."), (3, "Yes, there is."), (4, "Yes")]])
    result = score_file("pope", preds, pope_dir, protocol="lenient")
    assert result["splits"]["random"]["accuracy"] == pytest.approx(100.0)
    assert result["splits"]["adversarial"]["accuracy"] == pytest.approx(50.0)
    assert result["accuracy"] == pytest.approx(75.0) and result["yes_ratio"] == pytest.approx(75.0)
    assert result["precision"] == pytest.approx(200 / 3) and result["recall"] == pytest.approx(100.0)

    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({
        "10": {"question": "q", "choices": ["a", "b", "c"], "answer": 1, "image": "image.png"},
        "11": {"question": "q", "choices": ["a", "b"], "answer": 0, "image": None},
        "12": {"question": "q", "choices": ["a", "b", "c"], "answer": 2, "image": "image.png"},
    }))
    preds = _jsonl(tmp_path / "sqa.jsonl", [{"question_id": "10", "text": "The answer is B."},
                                            {"question_id": "11", "text": "A"}, {"question_id": "12", "text": "dunno"}])
    result = score_file("sqa", preds, problems, protocol="lenient")
    assert result["accuracy"] == pytest.approx(200 / 3) and result["img_accuracy"] == pytest.approx(50.0)
    assert result["unparsable"] == 1 and result["n_img"] == 2


def test_bad_inputs_are_reported_not_silently_scored(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "2"}] * 10}]}))
    # an unknown id is skipped and counted; an empty prediction is scored as wrong and counted
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": ""}, {"question_id": 99, "text": "2"}])
    result = score_file("vqav2", preds, ann, protocol="lenient")
    assert (result["n"], result["skipped_unknown_id"], result["empty_predictions"]) == (1, 1, 1)
    assert result["accuracy"] == 0.0
    assert "99" in capsys.readouterr().err
    with pytest.raises(FactoryError, match="--strict"):
        score_file("vqav2", preds, ann, strict=True)
    # the wrong annotation format names the expected one
    gqa = tmp_path / "gqa.json"
    gqa.write_text(json.dumps({"q1": {"answer": "left"}}))
    with pytest.raises(FactoryError, match="not in the vqav2 format"):
        score_file("vqav2", preds, gqa)
    # predictions that match nothing at all → error, not a score of 0
    other = _jsonl(tmp_path / "o.jsonl", [{"question_id": 5, "text": "x"}])
    with pytest.raises(FactoryError, match="different benchmarks"):
        score_file("vqav2", other, ann)
    # conflicting duplicates and malformed rows
    dup = _jsonl(tmp_path / "d.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 1, "text": "b"}])
    with pytest.raises(FactoryError, match="twice"):
        score_file("vqav2", dup, ann)
    bad = _jsonl(tmp_path / "b.jsonl", [{"id": 1, "answer": "a"}])
    with pytest.raises(FactoryError, match="question_id"):
        score_file("vqav2", bad, ann)
    assert score_main(["--benchmark", "nope", "--predictions", str(preds), "--annotations", str(ann)]) == 2
    assert "Unknown benchmark" in capsys.readouterr().err
