"""exitwise: early-exit inference for language models."""

from exitwise.errors import DataError, ExitwiseError, IncompatibleError, ModelNotFoundError
from exitwise.models.backbone import Backbone, LayerState
from exitwise.models.loading import load_model

__all__ = [
    "Backbone", "DataError", "ExitwiseError", "IncompatibleError", "LayerState", "ModelNotFoundError", "load_model",
]
__version__ = "0.1.0"
