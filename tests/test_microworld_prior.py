"""The micro-world's language prior (companion objects in the training scenes) and its POPE split (pope.json)."""
import json
import random
import re
from collections import Counter

from factory.data import microworld as mw
from factory.eval.microworld import score_rows

OBJECT = re.compile(r"a (\w+) (\w+) in the")


def objects_of(caption):
    return set(OBJECT.findall(caption))


def test_training_scenes_carry_the_prior_and_eval_scenes_do_not(tmp_path):
    root = mw.generate_microworld(tmp_path / "w", seed=0, num_train_images=1500, num_eval_images=500,
                                  num_pope_images=0)
    train = [objects_of(e["conversations"][1]["value"]) for e in json.loads((root / "pretrain.json").read_text())]
    held = [objects_of(e["caption"]) for e in json.loads((root / "eval.json").read_text())]

    def stats(scenes):
        counts = Counter(o for s in scenes for o in s)
        common = sum(counts[o] for o in mw.COMPANION_OF) / 6
        rare = sum(counts[o] for o in mw.ALL_OBJECTS if o not in mw.COMPANION_OF) / 9
        a, b = mw.COMPANIONS[0]
        with_a = [s for s in scenes if a in s]
        return common / rare, sum(b in s for s in with_a) / len(with_a)

    ratio, together = stats(train)
    assert ratio > 3 and together > 0.6  # measured: common objects ≈ 4× as frequent, companion along ≈ 70 %
    ratio, together = stats(held)
    assert ratio < 1.5 and together < 0.4  # eval.json: uniform scenes, no prior to lean on


def test_pope_rows_follow_each_sampling_rule(tmp_path):
    root = mw.generate_microworld(tmp_path / "w", seed=1, num_train_images=1, num_eval_images=1, num_pope_images=40)
    rows = json.loads((root / "pope.json").read_text())
    assert len(rows) == 40 * 6 and {r["question_type"] for r in rows} == {"existence"}
    by_sampling = Counter((r["pope_sampling"], r["answer"]) for r in rows)
    assert set(by_sampling.values()) == {40} and len(by_sampling) == 6  # each sampling half yes, half no
    for r in rows:
        present = objects_of(r["caption"])
        colour, shape = re.match(r"<image>\nIs there a (\w+) (\w+) in the image\?", r["conversations"][0]["value"]).groups()
        asked = (colour, shape)
        assert (asked in present) == (r["answer"] == "yes") and r["conversations"][1]["value"] == r["answer"]
        if r["answer"] == "no" and r["pope_sampling"] == "popular":
            assert asked in mw.COMPANION_OF
        if r["answer"] == "no" and r["pope_sampling"] == "adversarial":
            assert any(mw.COMPANION_OF.get(o) == asked for o in present)
    assert len({r["image"] for r in rows}) == 40 and all((root / "images" / r["image"]).is_file() for r in rows)


def test_pope_is_scored_per_sampling():
    rows = [{"question_type": "existence", "answer": a, "pope_sampling": s}
            for s in ("random", "adversarial") for a in ("yes", "no")]
    result = score_rows(list(zip(["yes", "no", "Yes.", "yes"], rows)))
    assert result["pope_by_sampling"]["random"]["accuracy"] == 100.0
    adversarial = result["pope_by_sampling"]["adversarial"]
    assert adversarial["accuracy"] == 50.0 and adversarial["yes_ratio"] == 100.0 and adversarial["fp"] == 1


def test_uniform_and_prior_scenes_are_valid():
    rng = random.Random(0)
    for prior in (True, False):
        for _ in range(300):
            scene = mw._random_scene(rng, prior=prior)
            assert 1 <= len(scene) <= 4
            assert len({(c, s) for c, s, _ in scene}) == len(scene) == len({i for _, _, i in scene})
