"""Test-wide settings: offline, no wandb, two CPU threads, and the real tokenizers shipped in tests/fixtures."""
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
TOKENIZERS = Path(__file__).resolve().parent / "fixtures" / "tokenizers"


@pytest.fixture(scope="session")
def real_tokenizers() -> Path:
    """tests/fixtures/tokenizers: the real Phi-2 (gpt2/phi2_codegen) and Llama/Vicuna (llama) tokenizers."""
    return TOKENIZERS


@pytest.fixture(scope="session")
def phi_tok(real_tokenizers):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_tokenizers / "gpt2" / "phi2_codegen"))


@pytest.fixture(scope="session")
def llama_tok(real_tokenizers):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_tokenizers / "llama"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-node launch tests (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU, skipped without one (run: pytest -m gpu)")
