from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.split("#")[0].strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="factory",
    version="0.1.0",
    description="Compose LLaVA-style multimodal models from registered components and train them with MoReS",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["factory", "factory.*"]),
    package_data={"factory": ["model/arch/*.json", "assets/**/*", "configs/**/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"test": ["pytest"]},
)
