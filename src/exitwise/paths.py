"""Where exitwise finds the data it did not ship: the task data directory and its text files."""

from __future__ import annotations

import os
from pathlib import Path

from exitwise.errors import DataError


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Explicit argument > $EXITWISE_DATA > ./shared/data or ../shared/data > next to the repository."""
    if data_dir is not None:
        p = Path(data_dir)
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (check --data-dir)")
        return p
    env = os.environ.get("EXITWISE_DATA")
    if env:
        p = Path(env)
        if not p.is_dir():
            raise DataError(f"$EXITWISE_DATA={env} is not a directory; fix it or pass --data-dir")
        return p
    cwd = Path.cwd()
    candidates = [cwd / "shared" / "data", cwd.parent / "shared" / "data",
                  Path(__file__).resolve().parents[2].parent / "shared" / "data"]
    for p in candidates:
        if p.is_dir():
            return p
    raise DataError("task data directory not found (looked in " + ", ".join(str(p) for p in candidates)
                    + "); pass --data-dir or set $EXITWISE_DATA")


def default_text(name: str = "test.txt", data_dir: str | Path | None = None) -> Path:
    """A plain-text file of the data directory's ``text/`` (WikiText splits: train/valid/test)."""
    return resolve_data_dir(data_dir) / "text" / name
