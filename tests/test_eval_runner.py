"""Generation through the eval pipeline on tiny models: equals step-by-step argmax, MoReS steers the prefill only,
interrupted runs resume without recomputing, shards merge, the micro-world eval and eval.py run end to end."""
import json

import pytest
import torch
from PIL import Image

from factory.errors import FactoryError
from factory.eval import generate as gen
from factory.eval.benchmark_run import PART_PREFIX, read_answer_parts, run_benchmark
from factory.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2).eval()


@pytest.fixture()
def images(tmp_path):
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(tmp_path / f"img{i}.png")
    return tmp_path


def _questions(n=5):
    texts = ["What color is the shape?", "How many shapes are there in the image?", "Where is it?",
             "Is there a red circle in the image? Answer yes or no.", "Describe it."]
    return [{"question_id": i, "text": texts[i % len(texts)], "image": f"img{i}.png" if i != 2 else None}
            for i in range(n)]


def _argmax_reference(model, prompt_ids, pixels, max_new_tokens, stops):
    """Greedy decoding without a KV cache: re-run the whole sequence for every new token."""
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels).logits
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        new.append(token)
        ids.append(token)
    return new


def _check_against_reference(model, questions, folder, max_new_tokens=6):
    batch = gen.prepare_batch(model, [gen.conversation_for(q) for q in questions],
                              [q["image"] for q in questions], folder)
    got = gen.generate_ids(model, batch, max_new_tokens)
    stops = set(gen.stop_token_ids(model))
    k = 0
    for i, q in enumerate(questions):
        prompt = batch["input_ids"][i, -batch["prompt_lengths"][i]:].tolist()
        pixels = None
        if q["image"]:
            pixels = batch["pixel_values"][k:k + 1]
            k += 1
        assert got[i] == _argmax_reference(model, prompt, pixels, max_new_tokens, stops), f"sample {i}"
    return got


def test_batched_generation_equals_stepwise_argmax(model, images):
    got = _check_against_reference(model, _questions(5), images)
    assert any(len(g) > 0 for g in got)
    lengths = gen.prepare_batch(model, [gen.conversation_for(q) for q in _questions(5)],
                                [q["image"] for q in _questions(5)], images)["prompt_lengths"]
    assert len(set(lengths)) > 1   # the batch really was left-padded


def test_mores_steers_prefill_only(images):
    pytest.importorskip("factory.tuners.mores", reason="the MoReS tuner (factory/tuners/mores.py) is not present")
    from factory.tuners import apply_tuning

    steered = tiny_model(layers=2, seed=1)
    plain_logits = None
    questions = _questions(4)
    batch = gen.prepare_batch(steered, [gen.conversation_for(q) for q in questions],
                              [q["image"] for q in questions], images)
    with torch.no_grad():
        plain_logits = steered(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    apply_tuning(steered, {"name": "mores", "rank": 1, "layers": "all", "positions": "f4+l5", "dropout": 0.0})
    mores = steered.llm.mores
    with torch.no_grad():
        for module in mores.interventions.values():
            module.project.bias.fill_(3.0)   # a strong steer, so a wrong application would change the tokens
    steered.eval()
    with torch.no_grad():
        logits = steered(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    assert not torch.allclose(logits, plain_logits, atol=1e-4)   # steering is active on the prompt
    calls = []
    handles = [m.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
               for m in mores.interventions.values()]
    try:
        got = gen.generate_ids(steered, batch, max_new_tokens=5)
    finally:
        for h in handles:
            h.remove()
    # one call per layer (the prefill), on the f4+l5 positions of the 3 samples with an image; none while decoding
    assert len(calls) == len(mores.interventions)
    assert all(c == 3 * 9 for c in calls)
    assert any(got)
    # and the KV-cached result equals re-running the steered prompt at every step
    _check_against_reference(steered, questions, images, max_new_tokens=5)


def test_interrupted_run_resumes_without_recomputing(model, images, tmp_path, monkeypatch):
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in _questions(5)))
    out = tmp_path / "out"
    first = run_benchmark(model, "gqa", qfile, out, image_folder=images, batch_size=2, max_new_tokens=4,
                          progress=False)
    assert first["generated_this_run"] == 5
    part = out / f"{PART_PREFIX}0.jsonl"
    lines = part.read_text().splitlines()
    kept = {json.loads(l)["question_id"]: json.loads(l)["answer_id"] for l in lines[:3]}
    part.write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])   # killed mid-write: a torn last line
    (out / "answers.jsonl").unlink()
    asked = []
    real = gen.answer_questions
    monkeypatch.setattr("factory.eval.benchmark_run.answer_questions",
                        lambda m, qs, *a, **k: asked.extend(q["question_id"] for q in qs) or real(m, qs, *a, **k))
    second = run_benchmark(model, "gqa", qfile, out, image_folder=images, batch_size=2, max_new_tokens=4,
                           progress=False)
    assert second["generated_this_run"] == 2 and sorted(asked) == [3, 4]
    rows = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(kept[r["question_id"]] == r["answer_id"] for r in rows if r["question_id"] in kept)
    assert {"question_id", "prompt", "text", "model_id"} <= set(rows[0]) and rows[0]["image"] == "img0.png"
    results = json.loads((out / "results.json").read_text())
    assert results["n_questions"] == 5 and "config" in results


def test_shards_merge_on_rank0(model, images, tmp_path, monkeypatch):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in _questions(5)))
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_benchmark(model, "gqa", qfile, out, image_folder=images, batch_size=4, max_new_tokens=2,
                         progress=False) is None
    assert sorted(read_answer_parts(out)) == ["1", "3"]
    monkeypatch.setenv("RANK", "0")
    result = run_benchmark(model, "gqa", qfile, out, image_folder=images, batch_size=4, max_new_tokens=2,
                           progress=False, merge_wait_s=5)
    assert result["generated_this_run"] == 3
    assert [json.loads(l)["question_id"] for l in (out / "answers.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_missing_images_error_or_counted_skip(model, images, tmp_path):
    qs = _questions(3) + [{"question_id": 7, "text": "?", "image": "nope.png"}]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    with pytest.raises(FactoryError, match="nope.png"):
        run_benchmark(model, "gqa", qfile, tmp_path / "o1", image_folder=images, progress=False)
    result = run_benchmark(model, "gqa", qfile, tmp_path / "o2", image_folder=images, max_new_tokens=2,
                           skip_missing_images=True, progress=False)
    assert result["skipped_missing_image"] == 1 and result["n_questions"] == 3


def _microworld(tmp_path, n=10):
    from factory.data.microworld import generate_microworld

    return generate_microworld(tmp_path / "mw", seed=0, num_train_images=1, num_eval_images=n, image_size=32)


def test_microworld_eval_end_to_end_random_model(model, tmp_path):
    from factory.eval.microworld import QUESTION_TYPES, evaluate_microworld, format_table

    root = _microworld(tmp_path)
    result = evaluate_microworld(model, root / "eval.json", root / "images", batch_size=4, max_new_tokens=4)
    assert result["n"] == 10 and 0.0 <= result["accuracy"] <= 100.0
    assert set(result["per_type"]) == set(QUESTION_TYPES)
    assert all(0.0 <= v <= 100.0 for v in result["per_type"].values())
    assert result["pope"]["n"] == 2 and 0.0 <= result["pope"]["yes_ratio"] <= 100.0
    assert "accuracy" in format_table(result)
    limited = evaluate_microworld(model, root / "eval.json", root / "images", batch_size=4, max_new_tokens=2, limit=3)
    assert limited["n"] == 3


def test_microworld_scoring_rules():
    from factory.eval.microworld import score_rows

    rows = [("Red.", {"question_type": "color", "answer": "red"}),
            ("2", {"question_type": "count", "answer": "two"}),
            ("The top left", {"question_type": "position", "answer": "top left"}),
            ("circle", {"question_type": "shape", "answer": "square"}),
            ("Yes.", {"question_type": "existence", "answer": "yes"}),
            ("No.", {"question_type": "existence", "answer": "yes"}),
            # not an exact match, but POPE's yes/no rule reads it as "yes"
            ("Yes, there is.", {"question_type": "existence", "answer": "yes"})]
    result = score_rows(rows)
    assert result["per_type"] == pytest.approx({"color": 100.0, "count": 100.0, "existence": 100 / 3,
                                                "position": 100.0, "shape": 0.0})
    assert result["accuracy"] == pytest.approx(400 / 7) and result["n"] == 7
    assert result["pope"]["recall"] == pytest.approx(200 / 3) and result["pope"]["fn"] == 1


def _hand_made_checkpoint(tmp_path, data_root):
    """A checkpoint folder as train.py writes it (config.yaml, meta.json, trainable.safetensors), without training."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from factory.testing import tiny_config
    from factory.tuners import apply_tuning

    cfg = tiny_config(layers=2)
    cfg.tuner = {"name": "mores", "rank": 1, "layers": "all", "positions": "f4+l5", "modality": "vision",
                 "dropout": 0.05}
    cfg.stage = {"instruct": {"tune": {"vision": "frozen", "connector": "full", "llm": "tuner"}}}
    cfg.data = {"name": "microworld", "root": str(data_root),
                "eval": {"json": "${data.root}/eval.json", "image_folder": "${data.root}/images"}}
    model = tiny_model(layers=2)
    apply_tuning(model, cfg.tuner, {"vision": "frozen", "connector": "full", "llm": "tuner"})
    folder = tmp_path / "run" / "instruct"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()},
              str(folder / "trainable.safetensors"))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "meta.json").write_text(json.dumps({"stage": "instruct", "template": "phi", "seed": 0}))
    return folder


def test_eval_cli_microworld_and_imbalance_from_checkpoint(tmp_path, capsys):
    from factory.eval.cli import main

    root = _microworld(tmp_path, n=5)
    ckpt = _hand_made_checkpoint(tmp_path, root)
    assert main([f"checkpoint={ckpt}", "benchmark=microworld", "batch_size=5", "max_new_tokens=3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((ckpt / "eval" / "microworld" / "results.json").read_text())
    assert results["metrics"]["n"] == 5 and 0 <= summary["metrics"]["accuracy"] <= 100
    assert results["config"]["eval"]["benchmark"] == "microworld"
    assert results["config"]["checkpoint_config"]["tuner"]["name"] == "mores"
    assert main([f"checkpoint={ckpt}", "analysis=imbalance", "imbalance.num_samples=2",
                 "imbalance.max_new_tokens=2"]) == 0
    assert (ckpt / "eval" / "imbalance" / "imbalance.png").is_file()
    assert json.loads((ckpt / "eval" / "imbalance" / "imbalance.json").read_text())["label"] == "mores"
    assert main([f"checkpoint={ckpt}", "no_such_key=1"]) == 2
    assert "Unknown setting" in capsys.readouterr().err


def test_chat_one_shot_and_interactive_multi_turn(tmp_path, capsys, monkeypatch):
    """chat.py answers one question, and in interactive mode keeps the conversation: the second answer is the one
    a session holding the first turn gives, and an empty line ends the chat."""
    import io

    from factory.eval.chat import ChatSession, main
    from factory.checkpoint import load_checkpoint

    root = _microworld(tmp_path, n=2)
    ckpt = _hand_made_checkpoint(tmp_path, root)
    image = sorted((root / "images").iterdir())[0]
    first, second = "What color is the shape?", "How many shapes are there in the image?"
    args = [f"checkpoint={ckpt}", f"image={image}", "max_new_tokens=4"]

    reference = ChatSession(load_checkpoint(ckpt), str(image), max_new_tokens=4)
    expected = [reference.ask(first), reference.ask(second)]
    assert [t["from"] for t in reference.turns] == ["human", "gpt", "human", "gpt"]
    assert reference.turns[0]["value"].startswith("<image>\n") and "<image>" not in reference.turns[2]["value"]

    assert main([*args, f"question={first}"]) == 0
    assert capsys.readouterr().out.strip() == expected[0].strip()

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first}\n{second}\n\nnever asked\n"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("ASSISTANT:") == 2, out
    # Piped questions get no "USER: " prompt: stdout is exactly one line per answer.
    assert out.splitlines() == [f"ASSISTANT: {answer}" for answer in expected]

    assert main([f"checkpoint={ckpt}", f"image={tmp_path / 'missing.png'}", "question=hi"]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_eval_py_seed_reaches_mmmus_random_fallback_and_results(tmp_path, capsys):
    """eval.py's `seed` is the MMMU official scorer's seed for unparsable answers, recorded in results.json; the
    metrics equal `python -m factory.eval.score --seed` on the same answers."""
    from factory.eval.cli import main
    from factory.eval.score import score_file

    ckpt = _hand_made_checkpoint(tmp_path, tmp_path)
    questions = [{"question_id": f"q{i}", "text": f"Question {i}: pick one."} for i in range(12)]
    qfile = tmp_path / "mmmu_questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    truth = [{"question_id": f"q{i}", "answer": "ABCD"[i % 4], "question_type": "multiple-choice",
              "options": str(["red", "green", "blue", "yellow"])} for i in range(12)]
    annotations = tmp_path / "mmmu.jsonl"
    annotations.write_text("".join(json.dumps(t) + "\n" for t in truth))

    metrics = {}
    for seed in (7, 42):
        out = tmp_path / f"out{seed}"
        args = [f"checkpoint={ckpt}", "benchmark=mmmu", f"question_file={qfile}", f"annotations={annotations}",
                f"output_dir={out}", "max_new_tokens=2", "batch_size=12"]
        assert main(args + ([f"seed={seed}"] if seed != 42 else [])) == 0  # 42 is the default
        capsys.readouterr()
        results = json.loads((out / "results.json").read_text())
        assert results["seed"] == seed and results["metrics"]["seed"] == seed
        assert results["config"]["eval"]["seed"] == seed
        assert results["metrics"]["random_guesses"] == 12  # a random tiny model's 2 tokens never name an option
        assert dict(results["metrics"], benchmark="mmmu") == score_file("mmmu", out / "answers.jsonl", annotations,
                                                                         seed=seed)
        metrics[seed] = results["metrics"]["accuracy"]
    # the guesses differ with the seed (12 guesses among 4 letters; these two seeds give different totals)
    assert metrics[7] != metrics[42]
    assert main([f"checkpoint={ckpt}", "seed=abc"]) == 2
    assert "seed" in capsys.readouterr().err
