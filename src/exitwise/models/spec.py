"""Which model to run and how: :class:`ModelSpec` (name, weights' dtype, device), the one place the
commands' model defaults are written."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m"
# auto: int4 where int4 holds the model's layer weights exactly (the bundled SmolLM2's layers are 4-bit
# GGUF blocks), else float32 (exitwise.models.quantize.auto_dtype)
DEFAULT_DTYPE = "auto"
DEFAULT_DEVICE = "cpu"


@dataclass(frozen=True)
class ModelSpec:
    """A model as plain values (picklable to a Ray worker): ``name`` for :func:`exitwise.load_model` (a
    bundled name, a directory, a ``.gguf`` file or a hub id; None: the model an artefact records, a
    RAEE database's, resolved by what opens the artefact), the matmul weights' ``dtype`` and the torch
    ``device``."""

    name: str | None = DEFAULT_MODEL
    dtype: str = DEFAULT_DTYPE
    device: str = DEFAULT_DEVICE

    def load(self):
        """The :class:`~exitwise.models.backbone.Backbone` this spec names."""
        from exitwise.models.loading import load_model

        if self.name is None:
            raise ValueError("this ModelSpec names no model (name=None: the model an artefact records)")
        return load_model(self.name, device=self.device, dtype=self.dtype)
