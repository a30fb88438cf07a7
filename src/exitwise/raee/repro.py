"""What makes a RAEE database, and a RAEE prediction, the same whatever the thread count, the Ray
workers or the batch (docs/reproducibility.md says what is guaranteed and what was measured).

Two things move a float result in its last bits: the order of a reduction (which changes with the
thread count where a library splits the work, and with the row count where a BLAS picks another
kernel for a small matrix), and padding (masked keys still change the order of an attention sum).
A build or a prediction avoids both:

* **The pass** (``last_token_states``, ``predict_at_layers``, ``predict_in_pass``) never pads: a batch
  holds prompts of one token length (``layerwise._batches``). Where every matmul of the layers runs
  exitwise's int4 / int8 CPU kernel, whose result for a row is the same at every row count and
  thread count, batches of up to ``batch_size`` run at the caller's thread count, with the kernel
  forced for every row count (``int_kernels_only``, whatever ``QuantizedLinear.kernel_rows`` says).
  Anything else (float32 or bfloat16 weights, whose matmuls are the BLAS's, or a CPU without the
  kernel) runs at one thread, and prompts under :data:`GEMM_SHARED_ROWS` tokens alone (see
  :attr:`PassPlan.alone_below`).
* **The readout fit and the training split's probabilities** run at :data:`FIT_THREADS` threads:
  they reduce over the whole split, where the BLAS's order depends on the thread count.
* **Readouts at an exit** are computed one row at a time, so a text's confidence is the same alone
  and in a batch.
* **A separate key encoder** (MiniLM, ``backbone-mean:<k>``: its own padded float32 passes) encodes
  one text at a time at one thread (:func:`encode_alone`); the default in-pass key is the pass's own.

The plan is recorded in the database manifest (``reproducibility``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from exitwise.models import kernels
from exitwise.models.quantize import QuantizedLinear, int_kernels_only

if TYPE_CHECKING:
    from exitwise.models.backbone import Backbone
    from exitwise.raee.encoders import Encoder

FIT_THREADS = 1  # threads of the readout fit, whatever the build's own
ENCODER_THREADS = 1  # threads of a separate key encoder, which encodes one text at a time
GEMM_SHARED_ROWS = 4  # from this many rows on, a row's bits in MKL's one-thread SGEMM do not move


@dataclass(frozen=True)
class PassPlan:
    """How a RAEE pass over a backbone runs so that a row's result does not depend on its batch or on
    the thread count."""

    weights: str  # the layers' matmul weights ("int4", "float32", ...)
    device: str  # "cpu", "cuda", ...: the guarantee is the CPU's
    row_invariant: bool  # every layer matmul on exitwise's kernel: batches and any thread count

    @property
    def pinned(self) -> bool:
        """One thread, short prompts alone: the BLAS's matmuls on the CPU. (A GPU keeps its batches and
        is not covered: its kernels choose algorithms by shape.)"""
        return self.device == "cpu" and not self.row_invariant

    @property
    def threads(self) -> int | None:
        """Torch threads the pass runs at; None: the caller's."""
        return 1 if self.pinned else None

    @property
    def alone_below(self) -> int:
        """Prompts of fewer tokens than this run one at a time (0: none). MKL's one-thread float32 GEMM
        gives a row of a 1-3 row product other bits than the same row in a larger product, and the
        same bits from 4 rows on (measured at SmolLM2's and the tests' shapes): a prompt of 4 or more
        tokens has at least 4 rows in every batch it can land in."""
        return GEMM_SHARED_ROWS if self.pinned else 0

    def describe(self) -> dict:
        """The manifest's ``reproducibility.pass`` entry."""
        batches = "one token length, no padding"
        if self.pinned:
            batches += f"; prompts under {GEMM_SHARED_ROWS} tokens alone"
        return {**asdict(self), "threads": self.threads or "any", "guaranteed": self.device == "cpu",
                "batches": batches}

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The block runs with this plan's kernels and thread count (both restored after)."""
        with int_kernels_only() if self.row_invariant else fixed_threads(self.threads):
            yield


def pass_plan(backbone: Backbone) -> PassPlan:
    """The :class:`PassPlan` of ``backbone`` on this machine."""
    layers = [m for m in backbone.layers.modules() if isinstance(m, nn.Linear | QuantizedLinear)]
    on_kernel = (backbone.device.type == "cpu" and bool(layers) and kernels.ready()
                 and all(isinstance(m, QuantizedLinear) and m.kernel_scale is not None for m in layers))
    return PassPlan(weights=backbone.weight_dtype, device=backbone.device.type, row_invariant=on_kernel)


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Run the block at ``threads`` torch threads (None: leave them), then restore the caller's."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def encode_alone(encoder: Encoder, texts: list[str]) -> np.ndarray:
    """(N, dim) keys of a separate encoder, each text encoded alone at :data:`ENCODER_THREADS` threads:
    a padded batch, or the BLAS at another thread count, would move a key's last bits."""
    with fixed_threads(ENCODER_THREADS):
        return encoder.encode(texts, batch_size=1)


def describe(backbone: Backbone, in_pass_key: bool) -> dict:
    """The manifest's ``reproducibility`` entry: what makes this database independent of the thread
    count, the workers and the batch size it was built with."""
    keys = "the pass's own states" if in_pass_key else f"one text at a time at {ENCODER_THREADS} thread(s)"
    return {"pass": pass_plan(backbone).describe(), "fit_threads": FIT_THREADS, "readout_rows": "one at a time",
            "keys": keys}
