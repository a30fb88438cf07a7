"""exitwise: early-exit inference for language models."""

from exitwise.models.backbone import Backbone, LayerState
from exitwise.models.loading import ModelNotFoundError, load_model

__all__ = ["Backbone", "LayerState", "ModelNotFoundError", "load_model"]
__version__ = "0.1.0"
