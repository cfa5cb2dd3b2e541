"""Test-wide settings: offline, no wandb, two CPU threads, and the optional ../shared fixtures."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_tokenizers() -> Path:
    """../shared/fixtures/tokenizers (real Phi-2 and Llama/Vicuna tokenizers); skipped in a user's clone."""
    path = SHARED / "fixtures" / "tokenizers"
    if not path.is_dir():
        pytest.skip("../shared/fixtures/tokenizers is not present (only CI and developers have it)")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-node launch tests (deselect with -m 'not slow')")
