"""Config helpers: the OmegaConf resolvers the YAML files use and a compose() for tests and tools."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR.parent / "configs"
ASSETS_DIR = PACKAGE_DIR / "assets"


def register_resolvers() -> None:
    """`${asset:microworld/phi}` → absolute path of a file shipped in factory/assets (works from any cwd);
    `${sweep_job_dirname:num,overrides}` → a sweep job's folder name (factory/train/hydra_folders.py)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda rel: str(ASSETS_DIR / rel))
    if not OmegaConf.has_resolver("sweep_job_dirname"):
        from factory.train.hydra_folders import sweep_job_dirname

        OmegaConf.register_new_resolver("sweep_job_dirname", sweep_job_dirname)


def compose(overrides: Iterable[str] = (), config_name: str = "train", config_dir: Optional[Path] = None) -> DictConfig:
    """Compose the Hydra config exactly as `python train.py <overrides>` would (without running anything)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from factory.errors import FactoryError

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
        except Exception as err:  # hydra's own errors are precise but wrapped in long traces
            raise FactoryError(
                f"Could not compose the config with overrides {list(overrides)}: {err} "
                f"Check the group and option names (config groups live in {CONFIG_DIR})."
            ) from None
