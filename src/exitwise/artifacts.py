"""What every saved artefact (RAEE database, exit classifier, heads) shares: a JSON manifest with a
format number, and the fingerprint of the model it was made for."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from exitwise.errors import DataError, IncompatibleError

# Keys that must match for an artefact to be usable with a model; the name alone may differ (the
# same weights can be loaded from a bundled name, a directory or a .gguf path).
STRUCTURE = ("model_type", "num_layers", "hidden_size", "vocab_size")


def model_fingerprint(backbone) -> dict:
    return {"name": backbone.name, "model_type": backbone.config.model_type, "num_layers": backbone.num_layers,
            "hidden_size": backbone.hidden_size, "vocab_size": backbone.vocab_size}


def check_model(stored: dict, backbone, what: str) -> None:
    """Refuse ``backbone`` if it is not structurally the model ``stored`` describes; warn on a new name."""
    have = model_fingerprint(backbone)
    diffs = [f"{k}: {stored.get(k)!r} vs {have[k]!r}" for k in STRUCTURE if stored.get(k) != have[k]]
    if diffs:
        raise IncompatibleError(f"{what} was made for model {stored.get('name')!r}, not {have['name']!r} "
                                f"({'; '.join(diffs)})")
    if stored.get("name") != have["name"]:
        warnings.warn(f"{what} was made for model {stored.get('name')!r}; using it with {have['name']!r}, "
                      "which has the same shape", stacklevel=2)


def read_manifest(path: Path, fmt: int, what: str) -> dict:
    """Parse a JSON manifest and check its format number, with errors naming the file."""
    if not path.is_file():
        raise DataError(f"{path} not found: not a complete {what}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: unsupported {what} format {got!r} (expected {fmt})")
    return manifest
