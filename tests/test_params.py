"""The parameter report (python -m factory.params) on the meta device: the paper's exact TP* counts."""
import json
import subprocess
import sys

import pytest

from factory.config import CONFIG_DIR
from factory.params import PAPER_TP, TUNER_CONFIGS, count, main, tuner_configs

PAPER_EXACT = [(tuner, model, PAPER_TP[tuner][model])
               for tuner in ("mores", "lora", "ia3", "adapter") for model in ("llava_3b", "llava_7b", "llava_13b")]
PAPER_EXACT += [("mores_l", "llava_3b", 327_744), ("mores_h", "llava_3b", 655_488)]


@pytest.mark.parametrize("tuner,model,expected", PAPER_EXACT)
def test_paper_tp_counts(tuner, model, expected):
    result = count([f"model={model}", f"tuner={tuner}"])
    assert result["trainable_llm"] == expected
    assert result["trainable_vision"] == 0
    assert result["trainable_total"] == expected + result["trainable_connector"]


@pytest.mark.parametrize("model,layers,hidden", [("llava_3b", 32, 2560), ("llava_7b", 32, 4096),
                                                 ("llava_13b", 40, 5120)])
def test_oft_count_is_peft_storage(model, layers, hidden):
    block = hidden // 16
    result = count([f"model={model}", "tuner=oft"])
    # peft ≥ 0.16 stores each 16-block rotation as b(b-1)/2 skew-symmetric entries; the paper's peft 0.10 stored b²
    assert result["trainable_llm"] == result["peft_trainable"] == layers * 3 * 16 * block * (block - 1) // 2
    assert PAPER_TP["oft"][model] == layers * 3 * 16 * block * block



@pytest.mark.parametrize("model", ["llava_3b", "llava_7b", "llava_13b"])
def test_qlora_tp_is_loras(model):
    """QLoRA trains the same LoRA weights as tuner=lora (its 4-bit base is frozen): the paper's LoRA TP*."""
    result = count([f"model={model}", "tuner=qlora"])
    assert result["trainable_llm"] == result["peft_trainable"] == PAPER_TP["lora"][model]

def test_full_and_frozen_3b():
    full = count(["model=llava_3b", "tuner=full"])
    assert full["trainable_llm"] == 2_779_683_840  # Phi-2
    frozen = count(["model=llava_3b", "tuner=frozen"])
    assert frozen["trainable_llm"] == 0 and frozen["trainable_total"] == frozen["trainable_connector"] > 0
    assert frozen["total"] == full["total"]


def test_cli_prints_one_json_object_last(capsys):
    out = subprocess.run([sys.executable, "-m", "factory.params", "model=llava_3b", "tuner=ia3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) >= {"model", "tuner", "trainable_llm", "trainable_connector", "trainable_vision",
                           "trainable_total", "total"}
    assert (result["model"], result["tuner"], result["trainable_llm"]) == ("llava_3b", "ia3", 491_520)
    assert main(["model=llava_3b", "tuner=ia3", "+tuner.rnak=2"]) == 2  # a typo: one clear message, exit code 2
    err = capsys.readouterr().err
    assert "rnak" in err and "Traceback" not in err


def test_the_tuner_presets_are_read_from_the_shipped_configs(tmp_path):
    """TUNER_CONFIGS is configs/tuner/*.yaml (package data), so a new preset file is counted without editing
    factory/params.py (and test_table_equals_docs_params_md then asks for its row in docs/params.md)."""
    shipped = sorted(path.stem for path in (CONFIG_DIR / "tuner").glob("*.yaml"))
    assert list(TUNER_CONFIGS) == shipped
    assert {"frozen", "full", "mores", "mores_l", "mores_h", "lora", "ia3", "oft", "adapter"} <= set(shipped)
    (tmp_path / "tuner").mkdir()
    for name in ("zeta", "alpha"):
        (tmp_path / "tuner" / f"{name}.yaml").write_text("name: lora\n")
    (tmp_path / "tuner" / "README.txt").write_text("not a preset")
    assert tuner_configs(tmp_path) == ("alpha", "zeta")


def test_table_equals_docs_params_md():
    """docs/params.md is exactly what `python -m factory.params --table` writes: no TP* drifts unnoticed."""
    from factory.params import _DOC_HEAD, _DOC_TAIL, DOCS_PATH, table

    assert _DOC_HEAD + table() + _DOC_TAIL == DOCS_PATH.read_text()
