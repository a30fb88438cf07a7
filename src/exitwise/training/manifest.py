"""The manifest a fine-tuned model directory carries, read without importing torch-heavy modules.

``exitwise finetune`` writes ``exitwise_finetune.json`` beside the weights; the engine's config reads
it (``ExitConfig.finetuned_drafts``) so that ``LLM(DIR, speculative=True)`` and ``exitwise generate
--model DIR --speculative`` draft at the layers the model was trained to exit from, with no further
settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from exitwise.errors import DataError

MANIFEST = "exitwise_finetune.json"


def read_manifest(model: str | Path | None) -> dict | None:
    """The fine-tuning manifest of a model directory, or None when ``model`` is not such a directory."""
    if model is None:
        return None
    path = Path(str(model)).expanduser() / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("exit_layers", "draft_layers"):
        value = manifest.get(key)
        if not isinstance(value, list) or not all(isinstance(x, int) for x in value):
            raise DataError(f"{path}: field {key!r} must be a list of layer indices, got {value!r}")
    return manifest


def draft_layers(manifest: dict) -> list[int]:
    """Where a trained model's speculative drafts check for an exit (a subset of its trained exits)."""
    return list(manifest["draft_layers"])
