import os
from pathlib import Path

import pytest
import torch

# the server test modules' fixtures (tok, bb, server) and helpers
pytest_plugins = ["server_helpers"]

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


# `make test` sets EXITWISE_NO_SKIP=1: there a test that skips for want of a package, weights or data
# that `make` itself installs (or CI lays beside the clone) is a broken set-up, and it fails instead of
# hiding. Skips for what `make` cannot provide are allowed by their reason's prefix.
ALLOWED_SKIP_PREFIXES = ("needs CUDA", "needs a GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("EXITWISE_NO_SKIP") != "1" or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if reason.startswith(ALLOWED_SKIP_PREFIXES):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped under `make test` (EXITWISE_NO_SKIP=1) for want of something make provides: {reason}"
