"""The `official` protocol: every rule of the benchmarks' own evaluation code, on cases worked out by hand from that
code (GT-Vision-Lab/VQA vqaEval.py, LLaVA's m4c_evaluator.py / eval_pope.py / eval_science_qa.py /
convert_gqa_for_eval.py + GQA eval.py, MMMU's eval_utils.py, LLaVA's submission converters), quirks included, and
the protocol plumbing (CLI flag, default, what is recorded, eval.py's results)."""
import json
import random

import pytest

from factory.errors import FactoryError
from factory.eval import answer_metrics
from factory.eval.benchmarks import get_benchmark, score_and_export
from factory.eval.official import answer_processing as ap
from factory.eval.official import gqa, mmmu, pope, scienceqa, vqa
from factory.eval.score import main as score_main
from factory.eval.score import score_file


def _records(*answers, ids=True):
    """VQAv2-style answer records; the official file gives each its own answer_id."""
    return [dict({"answer": a, "answer_confidence": "yes"}, **({"answer_id": i + 1} if ids else {}))
            for i, a in enumerate(answers)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ VQAv2 / VizWiz
def test_vqa_unanimous_answers_are_not_normalised():
    ten_twos = _records(*["2"] * 10)
    assert vqa.vqaeval_accuracy("two", ten_twos) == 0.0       # the quirk: no normalisation at all
    assert vqa.vqaeval_accuracy("Two", ten_twos) == 0.0
    assert vqa.vqaeval_accuracy(" 2\n", ten_twos) == 1.0      # only newline/tab → space and strip
    assert vqa.vqaeval_accuracy("dog", _records(*["the dog"] * 10)) == 0.0
    assert answer_metrics.vqa_accuracy("two", ["2"] * 10) == 1.0      # lenient normalises the prediction anyway


def test_vqa_disagreeing_answers_normalise_both_sides():
    # numbers: "two" → "2" on the prediction once the humans disagree
    assert vqa.vqaeval_accuracy("two", _records(*["2"] * 9, "3")) == pytest.approx(1.0)
    # articles on the HUMAN answers: "the dog" → "dog" (3 of 10): (3 * 2/3 + 7 * 1) / 10
    humans = _records(*["the dog"] * 3, *["cat"] * 7)
    assert vqa.vqaeval_accuracy("dog", humans) == pytest.approx(0.9)
    assert answer_metrics.vqa_accuracy("dog", ["the dog"] * 3 + ["cat"] * 7) == 0.0   # lenient keeps "the dog"
    # contractions on the human answers: "dont" → "don't"
    assert vqa.vqaeval_accuracy("don't", _records(*["dont"] * 4, *["no"] * 6)) == pytest.approx(1.0)
    # punctuation: "hot-dog" → "hot dog"; "yes !" → "yes"
    assert vqa.vqaeval_accuracy("hot dog", _records(*["hot-dog"] * 3, *["pizza"] * 7)) == pytest.approx(0.9)
    assert vqa.vqaeval_accuracy("yes !", _records(*["yes"] * 5, *["no"] * 5)) == pytest.approx(1.0)


def test_vqa_leave_one_out_removes_one_record_at_a_time():
    # three "2" records with their own answer_ids: holding one out leaves 2 matches → 2/3; the 7 others see 3 → 1
    assert vqa.vqaeval_accuracy("2", _records(*["2"] * 3, *["3"] * 7)) == pytest.approx(0.9)
    # records identical in every field (no answer_id) are held out together, as vqaEval.py's `item != gtAnsDatum`
    assert vqa.vqaeval_accuracy("2", _records(*["2"] * 3, *["3"] * 7, ids=False)) == pytest.approx(0.7)
    # VizWiz: one record by position, whatever the records hold
    assert vqa.vqaeval_accuracy("2", _records(*["2"] * 3, *["3"] * 7, ids=False),
                                hold_out="position") == pytest.approx(0.9)


@pytest.mark.parametrize("raw, punctuated", [
    ("black-and-white", "black and white"),  # a mark not touching a space becomes a space
    ("yes !", "yes "),                        # touching a space: deleted
    ("2,000", "2000"),                        # a digit,digit group: every mark deleted
    ("3.5", "3.5"), ("end.", "end"), ("1.", "1"),
    ("it's", "it's"), ("3:30", "3:30"),       # apostrophe and colon are no punctuation here
    ("." * 33, "."),                          # re.UNICODE passed as the count: at most 32 periods go
])
def test_vqa_punctuation_step(raw, punctuated):
    assert ap.vqa_punctuation(raw) == punctuated


@pytest.mark.parametrize("raw, processed", [
    ("None of the Three", "0 of 3"), ("an apple", "apple"), ("dont", "don't"), ("couldntve", "couldntve"),
    ("couldnt've", "couldn't've"), ("somebody'd", "somebodyd"), ("Im", "im"), ("its", "its"), ("lets", "lets"),
])
def test_vqa_digit_article_contraction_step(raw, processed):
    assert ap.vqa_digits_articles(raw) == processed


def test_contraction_table_is_the_official_one():
    assert len(ap.CONTRACTIONS) == 120
    assert ap.CONTRACTIONS["yall'd've"] == ap.CONTRACTIONS["y'alld've"] == ap.CONTRACTIONS["y'all'dve"] == "y'all'd've"
    assert ap.CONTRACTIONS["Id've"] == "I'd've" and ap.CONTRACTIONS["let's"] == "let's"
    assert "hell" not in ap.CONTRACTIONS and "shell" not in ap.CONTRACTIONS and "well" not in ap.CONTRACTIONS


def test_vqav2_file_official_vs_lenient(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": _records(*["2"] * 10)},
        {"question_id": 2, "answers": _records(*["the dog"] * 3, *["cat"] * 7)},
    ]}))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "Two"}, {"question_id": 2, "text": "dog"}])
    official = score_file("vqav2", preds, ann)
    lenient = score_file("vqav2", preds, ann, protocol="lenient")
    assert official["protocol"] == "official" and lenient["protocol"] == "lenient"
    assert official["accuracy"] == pytest.approx(45.0)   # (0 + 0.9) / 2
    assert lenient["accuracy"] == pytest.approx(50.0)    # (1 + 0) / 2


# ------------------------------------------------------------------------------------------------ TextVQA
def test_textvqa_evaluator():
    assert vqa.textvqa_accuracy("Coca-Cola", ["coca cola"] * 10) == 1.0
    assert vqa.textvqa_accuracy("man's hat", ["mans hat"] * 10) == 0.0     # "'s" is split off: "man 's hat"
    assert vqa.textvqa_accuracy("STOP?", ["stop"] * 2 + ["go"] * 8) == pytest.approx(0.6)
    assert ap.evalai_answer("What's up?") == "what 's up"
    with pytest.raises(FactoryError, match="exactly 10"):
        vqa.textvqa_accuracy("x", ["x"] * 9, question_id=7)


# ------------------------------------------------------------------------------------------------ POPE
@pytest.mark.parametrize("text, parsed", [
    ("No", "no"), ("no,", "no"), ("not sure", "no"), ("No, there is none.", "no"),
    ("NO", "yes"), ("Nope.", "yes"), ("", "yes"), ("Not really", "yes"),   # case-sensitive: only No / not / no
    ("No\nthere is none", "yes"),        # split on single spaces: "No\nthere" is one piece
    ("Yes. No dog.", "yes"),             # only the text before the first period
])
def test_pope_answer(text, parsed):
    assert pope.pope_answer(text) == parsed


def test_pope_file_official_vs_lenient(tmp_path):
    labels = _jsonl(tmp_path / "coco_pope_random.json", [{"question_id": i, "label": "no"} for i in range(4)])
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": i, "text": t}
                                          for i, t in enumerate(["NO", "Nope.", "no", "Not at all"])])
    assert score_file("pope", preds, labels)["accuracy"] == pytest.approx(25.0)
    assert score_file("pope", preds, labels, protocol="lenient")["accuracy"] == pytest.approx(75.0)


# ------------------------------------------------------------------------------------------------ ScienceQA
@pytest.mark.parametrize("text, index", [
    ("B", 1), ("B. The sun", 1), ("The answer is B.", 1), ("The answer is B, the sun", 1),
    ("B.", -1), ("(C)", -1), ("b", -1), (" B", -1), ("The answer is B", -1),   # nothing after the letter
    ("The answer is A. The answer is B.", -1),   # the pattern must match exactly once
    ("The answer is E.", -1), ("D", -1),          # beyond the 3 choices
    ("F", -1), ("", -1),
])
def test_sqa_parsing(text, index):
    assert scienceqa.sqa_index(scienceqa.sqa_letter(text), num_choices=3) == index


def test_sqa_file_reports_img_accuracy(tmp_path):
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps({
        "1": {"choices": ["a", "b", "c"], "answer": 1, "image": "image.png"},
        "2": {"choices": ["a", "b"], "answer": 0, "image": None},
        "3": {"choices": ["a", "b", "c"], "answer": 2, "image": "image.png"},
    }))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": "1", "text": "B."}, {"question_id": "2", "text": "A"},
                                          {"question_id": "3", "text": "C. c"}])
    official = score_file("sqa", preds, problems)
    assert official["accuracy"] == pytest.approx(200 / 3) and official["img_accuracy"] == pytest.approx(50.0)
    assert official["unparsable"] == 1
    assert score_file("sqa", preds, problems, protocol="lenient")["accuracy"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------ GQA
def test_gqa_conversion_and_balanced_accuracy(tmp_path):
    assert gqa.gqa_prediction("Left..") == "left" and gqa.gqa_prediction("Left. ") == "left. "
    questions = tmp_path / "testdev_balanced_questions.json"
    questions.write_text(json.dumps({
        "a": {"answer": "left", "isBalanced": True, "types": {"structural": "query"}},
        "b": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
        "c": {"answer": "red", "isBalanced": False, "types": {"structural": "query"}},
        "d": {"answer": "no", "isBalanced": True, "types": {"structural": "logical"}},
    }))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": "a", "text": "Left."}, {"question_id": "b", "text": "yes "},
                                          {"question_id": "c", "text": "red"}, {"question_id": "d", "text": "No"}])
    result = score_file("gqa", preds, questions)
    assert result["n_balanced"] == 3 and result["accuracy"] == pytest.approx(200 / 3)   # "yes " ≠ "yes"
    assert result["open"] == pytest.approx(100.0) and result["binary"] == pytest.approx(50.0)
    assert score_file("gqa", preds, questions, protocol="lenient")["accuracy"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------ MMMU
def test_mmmu_choice_parsing():
    options = ["cat", "dog", "bird", "fish"]
    never = random.Random(0)
    assert mmmu.parse_choice("(C)", options, never) == "C"
    assert mmmu.parse_choice("The answer is B.", options, never) == "B"
    assert mmmu.parse_choice("(A) is tempting but (C) is right", options, never) == "C"   # last bracket wins
    assert mmmu.parse_choice("I believe the animal in the picture is a dog", options, never) == "B"
    assert never.getstate() == random.Random(0).getstate()     # no guess was needed
    assert mmmu.parse_choice("b", options, random.Random(42)) == random.Random(42).choice("ABCD")


def test_mmmu_open_parsing():
    assert mmmu.open_correct("5", mmmu.parse_open("So the answer is 5.0"))
    assert mmmu.open_correct(["4", "four"], mmmu.parse_open("x = 4"))
    assert mmmu.open_correct("1000", mmmu.parse_open("It costs 1,000 dollars"))
    assert not mmmu.open_correct("6", mmmu.parse_open("The result is 5"))
    assert mmmu.normalize_open("a") == [" a", "a "]


def test_mmmu_seeded_fallback_is_recorded(tmp_path):
    gold = tmp_path / "mmmu.json"
    gold.write_text(json.dumps([{"question_id": "q1", "answer": "A", "options": "['cat', 'dog', 'bird', 'fish']"},
                                {"question_id": "q2", "answer": "B", "options": ["x", "y"]},
                                {"question_id": "q3", "answer": "12", "question_type": "open"}]))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": "q1", "text": "no idea"},
                                          {"question_id": "q2", "text": "(B)"},
                                          {"question_id": "q3", "text": "The total is 12."}])
    # random.Random(42).choice("ABCD") == "A" (right), random.Random(7) gives "C" (wrong)
    seeded = score_file("mmmu", preds, gold)
    assert (seeded["seed"], seeded["random_guesses"], seeded["accuracy"]) == (42, 1, pytest.approx(100.0))
    other = score_file("mmmu", preds, gold, seed=7)
    assert (other["seed"], other["accuracy"]) == (7, pytest.approx(200 / 3))
    # lenient: no guess (q1 wrong) and open answers by exact match ("the total is 12" ≠ "12")
    assert score_file("mmmu", preds, gold, protocol="lenient")["accuracy"] == pytest.approx(100 / 3)


# ------------------------------------------------------------------------------------------------ exports
def test_official_submission_files(tmp_path):
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "What's up?", "image": "a.jpg"},
                                          {"question_id": 2, "text": "Two", "image": "b.jpg"}])
    out = json.loads(open(score_file("vqav2", preds, submission_dir=tmp_path / "o")["submission"]).read())
    assert out == [{"question_id": 1, "answer": "what 's up"}, {"question_id": 2, "answer": "2"}]
    lenient = score_file("vqav2", preds, submission_dir=tmp_path / "l", protocol="lenient")["submission"]
    assert json.loads(open(lenient).read())[0]["answer"] == "what's up"
    viz = json.loads(open(score_file("vizwiz", preds, submission_dir=tmp_path / "v")["submission"]).read())
    assert viz == [{"image": "a.jpg", "answer": "what 's up"}, {"image": "b.jpg", "answer": "2"}]
    questions = _jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a.jpg"}, {"question_id": 3, "image": "c"}])
    with pytest.raises(FactoryError, match="every question"):
        score_file("vizwiz", preds, questions=questions, submission_dir=tmp_path / "v2")
    mmvet = _jsonl(tmp_path / "m.jsonl", [{"question_id": 0, "text": "a"}, {"question_id": "v1_5", "text": "b"}])
    written = json.loads(open(score_file("mmvet", mmvet, submission_dir=tmp_path / "m")["submission"]).read())
    assert written == {"v1_0": "a", "v1_v1_5": "b"}        # LLaVA's converter always adds the prefix


# ------------------------------------------------------------------------------------------------ plumbing
def test_protocol_flag_default_and_errors(tmp_path, capsys):
    gold = tmp_path / "gqa.json"
    gold.write_text(json.dumps({"q1": {"answer": "left"}}))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": "q1", "text": "Left"}])
    assert score_main(["--benchmark", "gqa", "--predictions", str(preds), "--annotations", str(gold)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol"] == "official"
    with pytest.raises(SystemExit):
        score_main(["--benchmark", "gqa", "--predictions", str(preds), "--annotations", str(gold),
                    "--protocol", "strict"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(FactoryError, match="Unknown scoring protocol 'strict'"):
        score_file("gqa", preds, gold, protocol="strict")


def test_eval_results_record_the_protocol(tmp_path):
    gold = tmp_path / "gqa.json"
    gold.write_text(json.dumps({"q1": {"answer": "left"}}))
    rows = [{"question_id": "q1", "text": "Left"}]
    official = score_and_export(get_benchmark("gqa"), rows, tmp_path, gold, None, None)
    assert official["protocol"] == "official" and official["metrics"]["protocol"] == "official"
    lenient = score_and_export(get_benchmark("gqa"), rows, tmp_path, gold, None, None, "lenient")
    assert lenient["metrics"]["accuracy"] == 100.0 and official["metrics"]["accuracy"] == 100.0


def test_microworld_scores_the_same_under_both_protocols(tmp_path):
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps([
        {"id": "0", "image": "0.png", "question_type": "count", "answer": "two",
         "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "two"}]},
        {"id": "1", "image": "1.png", "question_type": "existence", "answer": "no",
         "conversations": [{"from": "human", "value": "<image>\nIs there a cat?"}, {"from": "gpt", "value": "no"}]},
    ]))
    preds = _jsonl(tmp_path / "p.jsonl", [{"question_id": "0", "text": "2"}, {"question_id": "1", "text": "NO"}])
    official = score_file("microworld", preds, eval_json)
    lenient = score_file("microworld", preds, eval_json, protocol="lenient")
    assert official["accuracy"] == lenient["accuracy"] == pytest.approx(100.0)
    assert official["per_type"] == lenient["per_type"]
