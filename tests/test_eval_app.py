"""eval.py and chat.py are Hydra apps (configs/eval.yaml, configs/chat.yaml): the documented commands compose, the
`benchmark` and `debug` groups work, user errors exit 2 with one message, and nothing is written into the current
folder (no outputs/, .hydra/ or log file)."""
import subprocess
import sys

import pytest
import yaml

from factory.eval.cli import load_config
from factory.errors import FactoryError
from train_support import REPO


def _run(tmp_path, script, *args):
    out = subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    return out.returncode, out.stdout, out.stderr


def test_eval_py_composes_the_documented_command_with_its_groups(tmp_path):
    code, out, err = _run(tmp_path, "eval.py", "--cfg", "job", "checkpoint=runs/x/instruct", "benchmark=pope",
                          "question_file=pope.jsonl", "image_folder=val2014", "annotations=coco_pope.json",
                          "debug=fast", "limit=20")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["benchmark"] == "pope" and cfg["checkpoint"] == "runs/x/instruct"
    # debug=fast: short answers and 8 imbalance samples; the command line still wins over the group (limit=20)
    assert (cfg["max_new_tokens"], cfg["limit"], cfg["imbalance"]["num_samples"]) == (8, 20, 8)
    assert list(tmp_path.iterdir()) == []


def test_eval_py_user_errors_exit_2_with_one_message(tmp_path):
    code, _, err = _run(tmp_path, "eval.py", "checkpoint=x", "no_such_key=1")
    assert code == 2
    assert err.startswith("error: Unknown setting(s) ['no_such_key'] for eval.py. Known keys: checkpoint, ")
    code, _, err = _run(tmp_path, "eval.py", "checkpoint=x", "benchmark=nope")
    assert code == 2 and "Could not find 'benchmark/nope'" in err and "vqav2" in err
    code, _, err = _run(tmp_path, "eval.py", "benchmark=pope")
    assert (code, err.strip()) == (2, "error: eval.py needs checkpoint=<folder> (a <run_dir>/<stage> folder "
                                      "written by train.py).")
    code, _, err = _run(tmp_path, "eval.py", f"checkpoint={tmp_path / 'nope'}", "batch_size=0")
    assert code == 2 and "`batch_size` must be an integer >= 1, got 0 (int)." in err  # checked before loading
    assert list(tmp_path.iterdir()) == []


def test_chat_py_user_errors_exit_2_with_one_message(tmp_path):
    code, _, err = _run(tmp_path, "chat.py", "image=a.png", "question=What is this?")
    assert (code, err.strip()) == (2, "error: chat.py needs checkpoint=<folder> (a <run_dir>/<stage> folder "
                                      "written by train.py).")
    code, _, err = _run(tmp_path, "chat.py", "checkpoint=x", "imag=a.png")
    assert code == 2 and err.startswith("error: Unknown setting(s) ['imag'] for chat.py.")
    code, out, _ = _run(tmp_path, "chat.py", "--cfg", "job", "checkpoint=x", "image=a.png",
                        "question=What is in the picture?")
    assert code == 0 and yaml.safe_load(out)["question"] == "What is in the picture?"
    assert list(tmp_path.iterdir()) == []


def test_chat_py_debug_group_shortens_answers_and_the_command_line_wins(tmp_path):
    """chat.py has eval.py's `debug` group: debug=fast caps answers at 8 tokens (default 256); a key on the command
    line still wins; the in-process composition (factory.eval.chat.main) is the same."""
    from factory.command_line import compose_app
    from factory.eval.chat import ROOT_CONFIG, USAGE

    args = ["--cfg", "job", "checkpoint=x", "image=a.png", "question=hi"]
    code, out, err = _run(tmp_path, "chat.py", *args)
    assert code == 0, err
    assert yaml.safe_load(out)["max_new_tokens"] == 256
    code, out, err = _run(tmp_path, "chat.py", *args, "debug=fast")
    assert code == 0, err
    assert yaml.safe_load(out)["max_new_tokens"] == 8
    code, out, err = _run(tmp_path, "chat.py", *args, "debug=fast", "max_new_tokens=20")
    assert code == 0 and yaml.safe_load(out)["max_new_tokens"] == 20
    assert compose_app(["checkpoint=x", "debug=fast"], ROOT_CONFIG, "chat.py", USAGE).max_new_tokens == 8
    code, _, err = _run(tmp_path, "chat.py", "checkpoint=x", "debug=slow")
    assert code == 2 and "Could not find 'debug/slow'" in err and "fast" in err
    assert list(tmp_path.iterdir()) == []


def test_in_process_composition_matches_the_app():
    cfg = load_config(["checkpoint=runs/x/instruct", "benchmark=gqa", "debug=fast"])
    assert (cfg.benchmark, cfg.limit, cfg.max_new_tokens, cfg.batch_size) == ("gqa", 8, 8, 8)
    with pytest.raises(FactoryError, match=r"Arguments must be key=value \(e\.g\. checkpoint=runs/x/instruct "
                                           r"benchmark=pope\); got \['--limit'\]"):
        load_config(["checkpoint=x", "--limit"])
