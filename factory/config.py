"""Config helpers: the OmegaConf resolvers the YAML files use and a compose() for tests and tools."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from factory.errors import FactoryError

PACKAGE_DIR = Path(__file__).resolve().parent


def _config_dir() -> Path:
    """The Hydra config tree: factory/configs in an installed package (setup.py maps the repository's configs/
    there), else configs/ at the root of a clone (also for an editable install)."""
    installed = PACKAGE_DIR / "configs"
    return installed if (installed / "train.yaml").is_file() else PACKAGE_DIR.parent / "configs"


CONFIG_DIR = _config_dir()
ASSETS_DIR = PACKAGE_DIR / "assets"


def register_resolvers() -> None:
    """`${asset:microworld/phi}` → absolute path of a file shipped in factory/assets (works from any cwd).
    (train.py also registers `${sweep_job_dirname:...}`, a run-folder concern: factory/train/hydra_folders.py.)"""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda rel: str(ASSETS_DIR / rel))


def compose(overrides: Iterable[str] = (), config_name: str = "train", config_dir: Optional[Path] = None) -> DictConfig:
    """Compose the Hydra config exactly as `python train.py <overrides>` would (without running anything)."""
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
