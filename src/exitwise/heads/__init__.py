"""Self-supervised early-exit heads (Valade v2; docs/papers.md): training, calibration, files."""

from exitwise.heads.model import ExitHeads, default_layers, entropy

__all__ = ["ExitHeads", "default_layers", "entropy"]
