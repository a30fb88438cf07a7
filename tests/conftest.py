import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EXITWISE_DATA", ROOT.parent / "shared" / "data"))

# One thread is much faster when another process is busy on this 2-core machine; CI runs alone.
torch.set_num_threads(int(os.environ.get("EXITWISE_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M (converted once into the safetensors cache)."""
    from exitwise import load_model

    return load_model("smollm2-135m")
