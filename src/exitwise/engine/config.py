"""One way to configure an engine: :class:`EngineConfig` (memory, batching, device) with an optional
:class:`ExitConfig` (who decides where to stop, and what happens to the skipped layers' K/V).

The knowledge of what a criterion needs lives here: heads decide with their own calibrated entropy
thresholds, so their engine threshold is 0 (a head's confidence is tau(alpha) - entropy), the heads
and the classifier are checked against the backbone they were made for, and speculative decoding on a
model from ``exitwise finetune`` drafts at the layers it was trained to exit from. Every default is a
field default here; the command line (:mod:`exitwise.cli.engine_args`) reads its flags' defaults from
these fields, and keyword construction (:meth:`EngineConfig.from_kwargs`) only renames.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from exitwise.engine.kv_fill import KV_FILLS
from exitwise.models.quantize import DEFAULT_HEAD_RESCORE
from exitwise.models.spec import ModelSpec

EXIT_MODES = ("batch", "sequence")


@dataclass
class ExitConfig:
    """Early exit: the criterion (a name or an ExitCriterion), where it may fire, and the KV policy."""

    criterion: object = "softmax"  # "softmax" | "hidden_similarity" | "classifier" | "heads" | an ExitCriterion
    layers: list[int] | None = None  # hidden-state indices where a check runs (default: the criterion's, or L/2..)
    threshold: float = 0.9  # per-request exit_threshold overrides it
    min_layer: int = 1  # per-request exit_min_layer overrides it
    kv_fill: str = "propagate"  # what the skipped layers' K/V become: "propagate" (CALM) or "full"
    mode: str = "batch"  # "batch": the batch leaves together; "sequence": each sequence on its own
    options: dict = field(default_factory=dict)  # the criterion's own (path=, alpha=, gate=, shortlist sizes)

    def __post_init__(self) -> None:
        from exitwise.exits.base import CRITERIA

        if isinstance(self.criterion, str) and self.criterion not in CRITERIA:
            raise ValueError(f"exit criterion {self.criterion!r} is unknown; choose one of {sorted(CRITERIA)}")
        if self.mode not in EXIT_MODES:
            raise ValueError(f"exit_mode must be one of {EXIT_MODES}, got {self.mode!r}")
        if isinstance(self.kv_fill, str) and self.kv_fill not in KV_FILLS:
            raise ValueError(f"kv_fill {self.kv_fill!r} is unknown; choose one of {sorted(KV_FILLS)}")

    @classmethod
    def heads(cls, path: str, alpha: float = 0.95, thresholds: str = "max_coverage", gate: bool = True,
              **kw) -> ExitConfig:
        """Exit with calibrated self-supervised heads at agreement level ``alpha`` (``thresholds``: which
        calibration, "max_coverage" or "guaranteed"). A head's confidence is tau(alpha) - entropy, so
        it fires at >= 0 whatever alpha was asked for: the engine threshold is 0."""
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"--alpha must lie in (0, 1), got {alpha}")
        options = {"path": path, "alpha": alpha, "mode": thresholds, "gate": gate}
        return cls("heads", threshold=0.0, options=options, **kw)

    @classmethod
    def classifier(cls, path: str, **kw) -> ExitConfig:
        """Exit with a trained exit classifier (``exitwise exit-classifier train``)."""
        return cls("classifier", options={"path": path}, **kw)

    @classmethod
    def finetuned_drafts(cls, model: str | None, **kw) -> ExitConfig | None:
        """The drafts of a model directory from ``exitwise finetune``: the softmax criterion at the layers
        its manifest recommends (``layers=`` in ``kw`` overrides them); None for any other model."""
        from exitwise.training.manifest import draft_layers, read_manifest

        manifest = read_manifest(model)
        if manifest is None:
            return None
        if kw.get("layers") is None:
            kw["layers"] = draft_layers(manifest)
        return cls("softmax", **kw)

    def build(self, backbone, weight_dtype: str = "float32", head_rescore: int = 0):
        """The ExitPlan for ``backbone``, its criterion's matmuls in ``weight_dtype`` (the engine's)."""
        from exitwise.engine.exit_plan import ExitPlan, default_exit_layers
        from exitwise.engine.kv_fill import make_kv_fill
        from exitwise.exits.base import make_criterion

        criterion = self.criterion
        if isinstance(criterion, str):
            opts = dict(self.options)
            if criterion in ("classifier", "heads"):  # both are trained for, and checked against, this model
                opts.setdefault("backbone", backbone)
            criterion = make_criterion(criterion, **opts)
        if hasattr(criterion, "use_weight_dtype"):  # (a criterion object need not subclass ExitCriterion)
            criterion.use_weight_dtype(weight_dtype, head_rescore)
        layers = self.layers or getattr(criterion, "layers", None) or default_exit_layers(backbone.num_layers)
        plan = ExitPlan(criterion, list(layers), make_kv_fill(self.kv_fill), backbone.num_layers,
                        threshold=self.threshold, min_layer=self.min_layer)
        if self.mode == "sequence":
            plan.check_sequence_mode()
        return plan


@dataclass
class EngineConfig:
    """Everything an :class:`~exitwise.engine.llm.LLMEngine` is built from."""

    kv_cache_bytes: int = 256 << 20  # KV block pool size (num_kv_blocks overrides)
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_num_seqs: int = 16  # sequences per step
    max_num_batched_tokens: int = 2048  # tokens per prefill step
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # the model an engine given none loads (name, weights' dtype, device); its device is the engine's
    model: ModelSpec | None = None
    device: str | torch.device | None = None  # None: the model spec's, else the model's
    # the layers' and the output head's matmul weights: "float32", "bfloat16", "int8" (weight-only,
    # per-channel, bfloat16 activations) or "int4" (layers per 32 columns, heads int8); activations,
    # norms and the KV cache stay float32. None: the model's own (load_model(dtype=...)); a float32
    # model may be run at a lower one
    weight_dtype: str | None = None
    head_rescore: int = DEFAULT_HEAD_RESCORE  # a low-precision head's top logits recomputed in float32 (0: off)
    # torch.compile the layers of full-depth decode steps as one graph (early-exit, prefill and
    # verification steps, and float32 batches of 2+ on oneDNN, stay eager): on CPU ~8% faster steps at
    # float32, 14-22% at bfloat16/int8, after 15-35 s of compiling per new shape (about 2 min over a
    # server's first steps with a cold inductor cache, ~20 s warm); see
    # benchmarks/results/step_overhead/step_overhead.md
    compile: bool = False
    exit: ExitConfig | None = None  # None: full depth
    # speculative decoding: drafts verified at full depth, so every token is the full model's (greedy:
    # identical tokens; sampled: the same distribution); see engine/speculative.py
    speculative: bool = False
    # who drafts (engine/drafts/): "auto" (context n-grams, else the exit criterion's early exits, else
    # none), "lookup" (context n-grams only), "exit" (early exits of ``exit`` only), "adapter" (the
    # shallow layers + ``draft_adapter``; auto tries it after the context and before early exits)
    draft: str = "auto"
    draft_adapter: str | None = None  # a trained draft adapter (exitwise heads train-adapter)
    adapter_threshold: float = 0.6  # an adapter draft stops at its first token less probable than this
    # adapter drafts read the head's rows of the ids below this plus the context's ids (0: the whole head;
    # engine/drafts/readout.py)
    draft_vocab: int = 0
    max_draft: int = 6

    def __post_init__(self) -> None:
        from exitwise.models.quantize import WEIGHT_DTYPES

        if self.model is not None:
            if self.device is None:
                self.device = self.model.device
            elif torch.device(self.device) != torch.device(self.model.device):
                raise ValueError(f"device {self.device!r} differs from the model spec's {self.model.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_draft"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_rescore < 0:
            raise ValueError(f"head_rescore must be >= 0, got {self.head_rescore}")
        if self.weight_dtype is not None and self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight dtype must be one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}")
        from exitwise.engine.drafts import DRAFT_SOURCES

        if self.draft not in DRAFT_SOURCES:
            raise ValueError(f"draft source {self.draft!r} is unknown; choose one of {', '.join(DRAFT_SOURCES)}")
        if self.speculative and self.draft == "adapter" and self.draft_adapter is None:
            raise ValueError("draft='adapter' drafts with a trained adapter: pass draft_adapter=PATH (--adapter PATH)")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0: the whole head), got {self.draft_vocab}")
        if not 0.0 <= self.adapter_threshold <= 1.0:
            raise ValueError(f"adapter_threshold must lie in [0, 1], got {self.adapter_threshold}")
        if self.speculative and self.exit is not None and self.exit.mode == "sequence":
            raise ValueError("exit_mode='sequence' is not combined with speculative decoding (drafts use the "
                             "batch exit rule)")

    def for_model(self, model: str | None) -> EngineConfig:
        """This config as it applies to the model named ``model`` (a Backbone's ``name``): speculative
        decoding without an exit criterion on a fine-tuned model drafts at the layers it was trained to
        exit from (:meth:`ExitConfig.finetuned_drafts`). Raises when ``draft="exit"`` has no criterion."""
        config = self
        if self.speculative and self.exit is None:
            drafts = ExitConfig.finetuned_drafts(model)
            if drafts is not None:
                config = replace(self, exit=drafts)
        if config.speculative and config.draft == "exit" and config.exit is None:
            raise ValueError("draft='exit' drafts with an exit criterion: pass exit=... (e.g. heads)")
        return config

    # The engine's keyword spelling (LLMEngine(model, exit="softmax", exit_threshold=0.8, ...)).
    _EXIT_KEYS = {"exit_layers": "layers", "exit_threshold": "threshold", "exit_min_layer": "min_layer",
                  "kv_fill": "kv_fill", "exit_mode": "mode", "exit_kwargs": "options"}

    @classmethod
    def from_kwargs(cls, **kw) -> EngineConfig:
        """An EngineConfig from LLMEngine's keyword arguments (``exit=`` and the ``exit_*`` keywords
        become its ExitConfig); unknown keywords raise TypeError naming them."""
        exit_kw = {cls._EXIT_KEYS[k]: kw.pop(k) for k in list(kw) if k in cls._EXIT_KEYS}
        exit_kw = {k: v for k, v in exit_kw.items() if v is not None}
        criterion = kw.pop("exit", None)
        if criterion is None and exit_kw.get("mode", ExitConfig.mode) not in EXIT_MODES:
            raise ValueError(f"exit_mode must be one of {EXIT_MODES}, got {exit_kw['mode']!r}")
        names = set(cls.__dataclass_fields__) - {"exit"}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown engine setting(s) {unknown}")
        exit_cfg = criterion if isinstance(criterion, ExitConfig) else (
            None if criterion is None else ExitConfig(criterion, **exit_kw))
        return cls(**kw, exit=exit_cfg)
