"""`pip install .` (non-editable) gives a working package: the configs travel inside it (setup.py maps the
repository's configs/ to factory/configs) and factory.config finds them there, so the parameter report and the
config composition of train.py work from any folder, without the clone.

The wheel is built from a copy of the sources and installed into a fresh virtual environment. Its dependencies
(torch, transformers, hydra ...) are not installed again: a .pth file puts the current environment's
site-packages on the new one's path — after its own, so that the `factory` imported is the installed wheel, never
the clone (the editable install of the current environment is a .pth hook, which a path entry does not run).
"""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd, env, timeout=300):
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, a folder outside the clone, the subprocess environment)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("setup.py", "README.md", "requirements.txt"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("factory", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", "."],
        cwd=src, env=env)
    wheel = next((tmp / "dist").glob("factory-*.whl"))

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    venv_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())
    parent_sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (venv_site / "zz_parent_environment.pth").write_text("\n".join(sorted(parent_sites)) + "\n")
    # --ignore-installed: the current environment's editable `factory` is visible through the .pth and must not
    # be uninstalled by pip.
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "--ignore-installed",
         "-q", wheel], cwd=tmp, env=env)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return python, elsewhere, env, venv_site


def test_installed_package_is_the_wheel_with_its_configs(installed):
    python, elsewhere, env, venv_site = installed
    out = run([python, "-c", "import factory, factory.config as c; print(factory.__file__); print(c.CONFIG_DIR)"],
              elsewhere, env)
    package_file, config_dir = out.strip().splitlines()[-2:]
    assert Path(package_file).parent == venv_site / "factory"
    assert Path(config_dir) == venv_site / "factory" / "configs"
    assert sorted(p.name for p in Path(config_dir, "tuner").glob("*.yaml")) == \
        sorted(p.name for p in (ROOT / "configs" / "tuner").glob("*.yaml"))


def test_parameter_report_from_another_folder(installed):
    python, elsewhere, env, _ = installed
    out = run([python, "-m", "factory.params", "model=llava_7b", "tuner=mores"], elsewhere, env)
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["model"], result["tuner"], result["trainable_llm"]) == ("llava_7b", "mores", 262_176)


def test_train_config_composes_and_passes_the_checks_from_another_folder(installed):
    """The equivalent of `python train.py model=llava_7b tuner=mores --cfg job` (train.py lives in the clone)."""
    python, elsewhere, env, _ = installed
    code = ("from omegaconf import OmegaConf\n"
            "from factory.config import compose\n"
            "from factory.config_checks import check_config\n"
            "cfg = compose(['model=llava_7b', 'tuner=mores', 'stage=all'])\n"
            "check_config(cfg)\n"
            "print(OmegaConf.to_yaml(cfg))\n")
    out = run([python, "-c", code], elsewhere, env)
    assert "name: mores" in out and "rank: 1" in out and "vicuna" in out


def test_installed_transformers_is_in_the_pinned_range():
    """requirements.txt pins transformers to the versions the suite has run with; this environment must be one."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    import transformers

    line = next(l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("transformers"))
    requirement = Requirement(line.split("#")[0].strip())
    assert requirement.specifier.contains(Version(transformers.__version__)), (transformers.__version__, line)
    assert not requirement.specifier.contains(Version("6.0")) and not requirement.specifier.contains(Version("5.40"))


def test_the_wheel_declares_the_lmms_eval_model(installed):
    """`python -m lmms_eval --model factory`: lmms-eval finds the model through the `lmms_eval.models` entry point of
    the installed package (setup.py), which names the manifest of FactoryLMMS."""
    python, elsewhere, env, _ = installed
    code = ("from importlib.metadata import entry_points\n"
            "print([e.value for e in entry_points(group='lmms_eval.models') if e.name == 'factory'])\n")
    out = run([python, "-c", code], elsewhere, env)
    assert out.strip().splitlines()[-1] == "['factory.harness.lmms_eval_model:lmms_eval_manifest']"
