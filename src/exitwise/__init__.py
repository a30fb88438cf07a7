"""exitwise: early-exit inference for language models."""

import os

# OpenMP threads that spin while they wait made two torch threads 3x slower than one whenever another
# process was busy on the same cores (6.5 vs 19.6 tok/s on this 2-core machine); passive waiting is
# never the slow setting (18.7 busy, 21.7 idle). It only takes effect before torch (libgomp) loads,
# i.e. for the CLI and for programs that import exitwise first; OMP_WAIT_POLICY=ACTIVE opts back in.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from exitwise.errors import DataError, ExitwiseError, IncompatibleError, ModelNotFoundError
from exitwise.models.backbone import Backbone, LayerState
from exitwise.models.loading import load_model
from exitwise.models.spec import ModelSpec

__all__ = [
    "Backbone", "DataError", "ExitwiseError", "IncompatibleError", "LayerState", "ModelNotFoundError", "ModelSpec",
    "load_model",
]
__version__ = "0.1.0"
