"""Evaluation caches are keyed: answers in an output folder are reused only for the same model and generation
settings; anything else leaves the folder untouched and goes to its keyed sibling, saying so. Settings that cannot
change an answer (batch size, process count, limit) keep resuming. Output-folder faults name the folder and the fix."""
from __future__ import annotations

import errno
import json
import pathlib
from pathlib import Path

import pytest
from PIL import Image

from factory.errors import FactoryError
from factory.eval.output_folder import KEY_FILE, settings_key
from factory.eval.benchmark_run import PART_PREFIX, run_benchmark
from factory.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2).eval()


@pytest.fixture()
def setup(tmp_path):
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 180 - 40 * i, 90)).save(tmp_path / f"img{i}.png")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "text": f"What color is shape {i}?",
                                         "image": f"img{i}.png"}) + "\n" for i in range(4)))
    return tmp_path, qfile


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(model, qfile, out, **kwargs):
    kwargs = {"image_folder": qfile.parent, "batch_size": 2, "max_new_tokens": 3, "progress": False, **kwargs}
    return run_benchmark(model, "gqa", qfile, out, **kwargs)


def test_other_generation_settings_start_fresh_next_to_the_kept_answers(model, setup, capsys):
    root, qfile = setup
    out = root / "out"
    first = _run(model, qfile, out)
    assert first["generated_this_run"] == 4 and first["output_dir"] == str(out)
    record = json.loads((out / KEY_FILE).read_text())
    assert record["key"] == first["cache_key"] == settings_key(record["settings"])
    assert record["settings"]["max_new_tokens"] == 3 and record["settings"]["decoding"] == "greedy"
    before = _snapshot(out)
    capsys.readouterr()

    second = _run(model, qfile, out, max_new_tokens=5)
    sibling = root / f"out-{second['cache_key'][:8]}"
    assert second["generated_this_run"] == 4 and second["output_dir"] == str(sibling)
    assert second["cache_key"] != first["cache_key"]
    assert _snapshot(out) == before  # the first answers, scores and key are untouched
    err = capsys.readouterr().err
    assert f"note: {out} holds answers made with other settings (max_new_tokens: 3 → 5)" in err
    assert f"writes to {sibling} instead" in err

    # each setting finds its own folder again and resumes there: nothing is generated twice
    assert _run(model, qfile, out, max_new_tokens=5)["generated_this_run"] == 0
    assert _run(model, qfile, out)["generated_this_run"] == 0
    assert _snapshot(out)[PART_PREFIX + "0.jsonl"] == before[PART_PREFIX + "0.jsonl"]
    # and once the first folder is gone, the second settings still find their answers
    for path in out.iterdir():
        path.unlink()
    out.rmdir()
    capsys.readouterr()
    again = _run(model, qfile, out, max_new_tokens=5)
    assert again["generated_this_run"] == 0 and again["output_dir"] == str(sibling)
    assert f"note: {sibling} holds the answers of this checkpoint and these settings; resuming there." in \
        capsys.readouterr().err


def test_another_model_or_question_file_is_not_served_old_answers(model, setup, capsys):
    root, qfile = setup
    out = root / "out"
    _run(model, qfile, out)
    capsys.readouterr()
    other = tiny_model(layers=2, seed=3).eval()
    result = _run(other, qfile, out)
    assert result["generated_this_run"] == 4 and result["output_dir"] != str(out)
    assert "(model weights changed)" in capsys.readouterr().err

    model.template, template = "plain", model.template  # same weights, another conversation format
    try:
        result = _run(model, qfile, out)
    finally:
        model.template = template
    assert result["generated_this_run"] == 4 and result["output_dir"] != str(out)
    assert "(prompt content changed; template: 'phi' → 'plain')" in capsys.readouterr().err

    qfile.write_text(qfile.read_text().replace("shape 2", "the shape"))  # same ids, another question
    result = _run(model, qfile, out)
    assert result["generated_this_run"] == 4 and result["output_dir"] != str(out)
    assert "question_file content changed" in capsys.readouterr().err


def test_a_change_in_prompt_building_is_a_new_key(model, setup, capsys, monkeypatch):
    """Same checkpoint, same template name, but the code builds another prompt (here: text before the image):
    the prompt ids are part of the key, so old answers are not reused."""
    from factory.eval import generate, output_folder

    root, qfile = setup
    out = root / "out"
    _run(model, qfile, out)
    capsys.readouterr()
    def text_first(q):
        return [{"from": "human", "value": f"{q['text']}\n<image>" if q.get("image") else q["text"]}]

    for module in (generate, output_folder):  # the prompt builder and the cache key's prompt probe (one function)
        monkeypatch.setattr(module, "conversation_for", text_first)
    result = _run(model, qfile, out)
    assert result["generated_this_run"] == 4 and result["output_dir"] != str(out)
    assert "with other settings (prompt content changed)" in capsys.readouterr().err


def test_batch_size_processes_and_limit_do_not_change_the_key(model, setup, monkeypatch):
    root, qfile = setup
    out = root / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _run(model, qfile, out, batch_size=1) is None  # rank 1 answers 1 and 3
    monkeypatch.setenv("RANK", "0")
    result = _run(model, qfile, out, batch_size=3, merge_wait_s=5)
    assert result["generated_this_run"] == 2 and result["output_dir"] == str(out)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _run(model, qfile, out, batch_size=4, limit=2)["generated_this_run"] == 0
    assert _run(model, qfile, out)["generated_this_run"] == 0
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("out")) == ["out"]


def test_answers_without_a_key_are_kept_and_not_reused(model, setup, capsys):
    """A folder written before answers were keyed (or by hand) has no record of its settings."""
    root, qfile = setup
    out = root / "out"
    out.mkdir()
    (out / f"{PART_PREFIX}0.jsonl").write_text(json.dumps({"question_id": 0, "text": "stale"}) + "\n")
    before = _snapshot(out)
    result = _run(model, qfile, out)
    assert result["generated_this_run"] == 4 and result["output_dir"] != str(out)
    assert _snapshot(out) == before
    assert "with no record of the checkpoint and settings that made them" in capsys.readouterr().err


def test_a_smaller_selection_says_it_replaces_the_merged_answers(model, setup, capsys):
    root, qfile = setup
    out = root / "out"
    _run(model, qfile, out)
    capsys.readouterr()
    assert _run(model, qfile, out, limit=2)["generated_this_run"] == 0
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2
    assert "held 4 answers; it now lists the 2 questions of this run" in capsys.readouterr().err
    assert _run(model, qfile, out)["n_questions"] == 4  # rebuilt from the part files, nothing generated
    assert len((out / "answers.jsonl").read_text().splitlines()) == 4


# ------------------------------------------------------------------------------------------- eval.py, faults
TUNER = {"name": "mores", "rank": 1, "layers": "all", "positions": "f4+l5", "modality": "vision", "dropout": 0.0}
TUNE = {"vision": "frozen", "connector": "full", "llm": "tuner"}

def _checkpoint(tmp_path: Path, seed: int = 0) -> Path:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from factory.testing import tiny_config
    from factory.tuners import apply_tuning

    folder = tmp_path / "run" / "instruct"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(layers=2)
    cfg.tuner = TUNER
    trained = tiny_model(layers=2, seed=seed)
    apply_tuning(trained, cfg.tuner, TUNE)
    save_file({k: v.contiguous() for k, v in trained.trainable_state_dict().items()},
              str(folder / "trainable.safetensors"))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "meta.json").write_text(json.dumps({"stage": "instruct", "template": "phi", "seed": 0, "tune": TUNE}))
    return folder


def test_eval_py_keys_answers_by_checkpoint_content(setup, capsys):
    from factory.eval.cli import main

    root, qfile = setup
    ckpt = _checkpoint(root)
    args = [f"checkpoint={ckpt}", "benchmark=gqa", f"question_file={qfile}", f"image_folder={root}",
            "max_new_tokens=2", "batch_size=4"]
    assert main(args) == 0
    default = ckpt / "eval" / "gqa"
    settings = json.loads((default / KEY_FILE).read_text())["settings"]
    assert set(settings["model"]) == {"config.yaml", "meta.json", "trainable.safetensors"}
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated_this_run"] == 0

    _checkpoint(root, seed=5)  # retrained in place: same folder, other weights
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["generated_this_run"] == 4 and summary["output_dir"].startswith(f"{default}-")
    assert "(checkpoint file trainable.safetensors changed)" in captured.err


def test_an_imbalance_analysis_never_replaces_another(setup, capsys):
    from factory.eval.cli import main

    root, qfile = setup
    ckpt = _checkpoint(root)
    args = [f"checkpoint={ckpt}", "analysis=imbalance", f"question_file={qfile}", f"image_folder={root}",
            "imbalance.max_new_tokens=2", "imbalance.num_samples=2"]
    assert main(args) == 0
    first = ckpt / "eval" / "imbalance"
    before = _snapshot(first)
    assert {"imbalance.json", "imbalance.png", KEY_FILE} <= set(before)
    capsys.readouterr()
    assert main([*args, "imbalance.num_samples=3"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["output_dir"].startswith(f"{first}-") and summary["n_samples"] == 3
    assert "(num_samples: 2 → 3)" in captured.err
    assert _snapshot(first) == before


def test_output_dir_that_is_a_file_names_it(setup, capsys):
    from factory.eval.cli import main

    root, qfile = setup
    ckpt = _checkpoint(root)
    blocker = root / "results.txt"
    blocker.write_text("not a folder")
    args = [f"checkpoint={ckpt}", "benchmark=gqa", f"question_file={qfile}", f"image_folder={root}"]
    assert main([*args, f"output_dir={blocker / 'pope'}"]) == 2
    err = capsys.readouterr().err
    assert f"Cannot write the evaluation results to {blocker / 'pope'}: {blocker} is a file, not a folder" in err
    assert "Pass output_dir=<a folder>" in err
    assert blocker.read_text() == "not a folder"


def test_read_only_checkpoint_default_output_dir_says_pass_output_dir(setup, capsys, monkeypatch):
    """Running as root, chmod cannot make a folder read-only: the mount's EROFS is raised where the folder is made."""
    from factory.eval.cli import main

    root, qfile = setup
    ckpt = _checkpoint(root)
    real_mkdir = pathlib.Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(ckpt)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    args = [f"checkpoint={ckpt}", "benchmark=gqa", f"question_file={qfile}", f"image_folder={root}",
            "max_new_tokens=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (f"Cannot write the evaluation results to {ckpt / 'eval' / 'gqa'} (Read-only file system: the disk is "
            f"mounted read-only). This is the default output folder, inside the checkpoint {ckpt}") in err
    assert "Pass output_dir=<a writable folder>" in err
    assert main([*args, f"output_dir={root / 'elsewhere'}"]) == 0
    assert (root / "elsewhere" / "answers.jsonl").is_file()


def test_disk_full_mid_run_keeps_answers_and_says_how_to_resume(model, setup, monkeypatch):
    root, qfile = setup
    out = root / "out"

    def full_disk(questions, output_dir, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "answers.jsonl.tmp"))

    monkeypatch.setattr("factory.eval.benchmark_run.merge_answers", full_disk)
    with pytest.raises(FactoryError) as err:
        _run(model, qfile, out)
    assert str(err.value).startswith(f"Writing the evaluation results failed at {out / 'answers.jsonl.tmp'} "
                                     "(No space left on device: the disk is full). Answers written so far are kept")
    assert len((out / f"{PART_PREFIX}0.jsonl").read_text().splitlines()) == 4
    monkeypatch.undo()
    assert _run(model, qfile, out)["generated_this_run"] == 0
