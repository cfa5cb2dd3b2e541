from pathlib import Path

from setuptools import find_namespace_packages, setup

here = Path(__file__).parent
requirements = [
    line.split("#")[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

# Data-only folders (model/arch, assets/microworld/...) are listed as packages too, so that setuptools ships them
# without warning that it would otherwise ignore them.
PACKAGES = find_namespace_packages(include=["factory", "factory.*"], exclude=["*__pycache__*"])
# configs/ stays at the repository root (train.py, eval.py and users of the clone read it there); an installed
# package carries it as factory/configs, where factory.config looks first.
CONFIG_GROUPS = find_namespace_packages(where=str(here / "configs"), exclude=["*__pycache__*"])
CONFIG_PACKAGES = ["factory.configs"] + [f"factory.configs.{group}" for group in CONFIG_GROUPS]

setup(
    name="factory",
    version="0.1.0",
    description="Compose LLaVA-style multimodal models from registered components and train them with MoReS",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=PACKAGES + CONFIG_PACKAGES,
    package_dir={"factory.configs": "configs"},
    package_data={"factory": ["model/arch/*.json", "assets/**/*"], **{p: ["*.yaml"] for p in CONFIG_PACKAGES}},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"test": ["pytest"]},
    # `python -m lmms_eval --model factory --model_args pretrained=<run>/<stage>`: lmms-eval reads this group
    # (its registry_v2) and gets the manifest of FactoryLMMS (factory/harness/lmms_eval_model.py)
    entry_points={"lmms_eval.models": ["factory = factory.harness.lmms_eval_model:lmms_eval_manifest"]},
)
