"""No code runs from data: a crafted pickle in a run folder's resume state is refused (and not executed) while an
honest resume stays bitwise exact; a checkpoint's config.yaml cannot switch trust_remote_code on for eval/chat; no
load in the package can unpickle arbitrary objects."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from factory.errors import FactoryError
from factory import checkpoint as ckpt
from train_support import make_small_world, read_metrics, train_cfg

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"trainer.max_steps": 4, "trainer.save_every": 2}


class Payload:
    """Unpickling this touches `marker`: the stand-in for `os.system(...)` in a crafted file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_small_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """(an uninterrupted 4-step run, a run interrupted right after its step-2 checkpoint)."""
    from factory.train import loop, run

    base = tmp_path_factory.mktemp("untrusted")
    run(train_cfg(base / "straight", world, stage="pretrain", **OVERRIDES))

    class Interrupted(Exception):
        pass

    real_save = ckpt.save_stage_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted

    loop.ckpt.save_stage_checkpoint = save_then_die
    try:
        with pytest.raises(Interrupted):
            run(train_cfg(base / "interrupted", world, stage="pretrain", **OVERRIDES))
    finally:
        loop.ckpt.save_stage_checkpoint = real_save
    return base / "straight", base / "interrupted"


def _resume(world, run_dir: Path):
    from factory.train import run

    return run(train_cfg(run_dir, world, stage="pretrain", resume=True, **OVERRIDES))


def _state_file(run_dir: Path, pattern: str) -> Path:
    found = sorted((run_dir / "pretrain" / "deepspeed").rglob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


@pytest.mark.parametrize("pattern", ["*optim_states.pt", "*model_states.pt", "rng_rank0.pt"])
def test_crafted_pickle_in_resume_state_is_refused_not_executed(world, runs, tmp_path, pattern):
    _, interrupted = runs
    run_dir = shutil.copytree(interrupted, tmp_path / "run")
    marker = tmp_path / "code-ran"
    target = _state_file(run_dir, pattern)
    torch.save({"optimizer_state_dict": Payload(marker)}, target)
    # the payload is live: a full-pickle load (what DeepSpeed's default engine does) runs it
    torch.load(target, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(FactoryError) as err:
        _resume(world, run_dir)
    assert not marker.exists(), "the crafted file was executed"
    message = str(err.value)
    assert f"Refused to load {target}" in message and "could run code" in message and "posix.system" in message


def test_raw_pickle_is_refused_too(tmp_path):
    """Not only torch's zip format: a plain pickle stream (any protocol) is refused before anything runs."""
    import pickle

    from factory.safe_load import load_torch_file

    marker = tmp_path / "code-ran"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"raw{protocol}.pt"
        path.write_bytes(pickle.dumps({"state": Payload(marker)}, protocol=protocol))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch notes a protocol above 2; irrelevant here
            with pytest.raises(FactoryError, match=f"Refused to load {re.escape(str(path))}"):
                load_torch_file(path)
        assert not marker.exists()


def test_honest_resume_is_bitwise_identical(world, runs, tmp_path):
    straight, interrupted = runs
    run_dir = shutil.copytree(interrupted, tmp_path / "run")
    _resume(world, run_dir)
    got, ref = read_metrics(run_dir), read_metrics(straight)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    a, b = ckpt.load_weights_file(straight / "pretrain"), ckpt.load_weights_file(run_dir / "pretrain")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_state_holds_only_allowlisted_classes(runs):
    """Every file DeepSpeed wrote loads under weights_only with exactly our allowlist (and not without it, so the
    allowlist is really needed and really used)."""
    from factory.safe_load import deepspeed_state_globals, load_torch_file

    _, interrupted = runs
    files = sorted((interrupted / "pretrain" / "deepspeed").rglob("*.pt"))
    assert len(files) == 3
    needs_allowlist = []
    for file in files:
        load_torch_file(file, deepspeed_state_globals())
        try:
            torch.load(file, weights_only=True)
        except Exception:
            needs_allowlist.append(file.name)
    assert needs_allowlist == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_resume_state_holds_no_frozen_weights(runs):
    """A mid-stage checkpoint's DeepSpeed state holds the trained connector only (exclude_frozen_parameters): the frozen
    vision tower and LLM are rebuilt from the config, and would make every save as big as the model."""
    from factory.safe_load import deepspeed_state_globals, load_torch_file

    _, interrupted = runs
    (states,) = (interrupted / "pretrain" / "deepspeed").rglob("*model_states.pt")
    module = load_torch_file(states, deepspeed_state_globals())["module"]
    assert module and all(name.startswith("connector.") for name in module), sorted(module)[:5]


def test_other_deepspeed_checkpoint_engines_are_refused_for_resume(runs, tmp_path):
    """A DeepSpeed config that selects another checkpoint engine (full pickle) cannot resume."""
    class Engine:
        checkpoint_engine = object()

    _, interrupted = runs
    with pytest.raises(FactoryError, match="loads files with full pickle"):
        ckpt.load_engine_state(Engine(), interrupted / "pretrain", 0)


# ------------------------------------------------------------------------------------------ trust_remote_code
def _checkpoint_asking_for_remote_code(tmp_path: Path, value=True) -> Path:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from factory.testing import tiny_config, tiny_model
    from factory.tuners import apply_tuning

    cfg = tiny_config(layers=2)
    cfg.llm.trust_remote_code = value
    cfg.tuner = {"name": "mores", "rank": 1, "layers": "all", "positions": "f4+l5", "modality": "vision",
                 "dropout": 0.0}
    tune = {"vision": "frozen", "connector": "full", "llm": "tuner"}
    model = tiny_model(layers=2)
    apply_tuning(model, cfg.tuner, tune)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()},
              str(folder / "trainable.safetensors"))
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "meta.json").write_text(json.dumps({"stage": "instruct", "template": "phi", "seed": 0, "tune": tune}))
    return folder


def test_checkpoint_cannot_switch_on_remote_code(tmp_path, capsys):
    from factory.eval.chat import main as chat_main
    from factory.eval.cli import main as eval_main

    folder = _checkpoint_asking_for_remote_code(tmp_path)
    with pytest.raises(FactoryError) as err:
        ckpt.load_checkpoint(folder)
    message = str(err.value)
    assert f"{folder / 'config.yaml'} sets llm.trust_remote_code=true" in message
    assert "pass trust_remote_code=true on the command line" in message

    assert eval_main([f"checkpoint={folder}", "question_file=q.jsonl", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "sets llm.trust_remote_code=true" in capsys.readouterr().err
    assert chat_main([f"checkpoint={folder}", "question=hi"]) == 2
    assert "sets llm.trust_remote_code=true" in capsys.readouterr().err

    # the explicit opt-in loads it (the tiny model ships no code, so nothing else changes)
    model = ckpt.load_checkpoint(folder, trust_remote_code=True)
    assert model.config["llm"]["trust_remote_code"] is True
    assert chat_main([f"checkpoint={folder}", "question=hi", "max_new_tokens=2", "trust_remote_code=true"]) == 0
    assert chat_main([f"checkpoint={folder}", "question=hi", "trust_remote_code=maybe"]) == 2
    assert "must be true or false" in capsys.readouterr().err


def test_a_string_is_not_a_way_around_the_opt_in(tmp_path):
    """YAML `trust_remote_code: "false"` is a string, which bool() would read as true: it counts as a request."""
    from factory.model.llms import remote_code_flag

    folder = _checkpoint_asking_for_remote_code(tmp_path, value="false")
    with pytest.raises(FactoryError, match="llm.trust_remote_code=\"false\""):
        ckpt.load_checkpoint(folder)
    with pytest.raises(FactoryError, match="set it to true or false"):
        remote_code_flag({"trust_remote_code": "false"})
    assert remote_code_flag({"trust_remote_code": False}) is False and remote_code_flag({}) is False


# --------------------------------------------------------------------------------------------- the whole package
def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unsafe_calls(source: str):
    """Calls that could run code from a file: torch.load without weights_only=True, any weights_only=False,
    pickle/dill/marshal/joblib loads, yaml.load without SafeLoader, numpy allow_pickle=True, torch.jit.load, and a
    hard-coded trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        true = lambda key: isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True  # noqa: E731
        false = lambda key: isinstance(keywords.get(key), ast.Constant) and keywords[key].value is False  # noqa: E731
        if name.endswith("torch.load") and not true("weights_only"):
            found.append((node.lineno, "torch.load without weights_only=True"))
        if false("weights_only"):
            found.append((node.lineno, "weights_only=False"))
        if name.split(".")[0] in ("pickle", "dill", "marshal", "joblib", "cloudpickle") and "load" in name:
            found.append((node.lineno, name))
        if name in ("yaml.unsafe_load", "yaml.full_load") or (
                name == "yaml.load" and "Safe" not in ast.unparse(keywords.get("Loader", ast.Constant("")))):
            found.append((node.lineno, f"{name} without SafeLoader"))
        if true("allow_pickle"):
            found.append((node.lineno, "allow_pickle=True"))
        if name.endswith("jit.load"):
            found.append((node.lineno, "torch.jit.load"))
        if true("trust_remote_code"):
            found.append((node.lineno, "trust_remote_code=True hard-coded"))
    return found


def test_the_scan_finds_each_unsafe_call():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\nyaml.load(s)\n"
           "np.load(p, allow_pickle=True)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n")
    assert [line for line, _ in unsafe_calls(bad)] == [1, 2, 2, 3, 4, 5, 6]
    assert unsafe_calls("torch.load(p, map_location='cpu', weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
                        "f(trust_remote_code=flag)\n") == []


def test_no_unsafe_load_anywhere_in_the_package():
    sources = sorted((REPO / "factory").rglob("*.py")) + sorted(REPO.glob("*.py")) + sorted(
        (REPO / "scripts").rglob("*.py"))
    found = [f"{path.relative_to(REPO)}:{line}: {what}" for path in sources
             for line, what in unsafe_calls(path.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


# The tests' own deliberate uses, each with its reason; any other unsafe load in a test fails the scan below.
TEST_ALLOWED = {
    ("test_untrusted_files.py", "torch.load without weights_only=True"): "shows the crafted payload is live",
    ("test_untrusted_files.py", "weights_only=False"): "shows the crafted payload is live",
    ("test_untrusted_files.py", "trust_remote_code=True hard-coded"): "the explicit opt-in under test",
    ("test_data.py", "pickle.loads"): "round-trips the test's own collator, as DataLoader workers do",
}


def test_tests_show_the_safe_pattern_too():
    """Tests are read as examples: they load saved state the safe way (safetensors or weights_only=True), apart from
    the listed deliberate cases."""
    found = [f"tests/{path.name}:{line}: {what}" for path in sorted((REPO / "tests").rglob("*.py"))
             for line, what in unsafe_calls(path.read_text(encoding="utf-8"))
             if (path.name, what) not in TEST_ALLOWED]
    assert not found, "\n".join(found)
