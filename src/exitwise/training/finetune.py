"""Self-distilled, LayerSkip-style fine-tuning: make a model's own intermediate layers readable.

A checkpoint trained without exits gives nothing to early exit: the readout of an intermediate hidden
state through the final norm and head rarely agrees with the last layer. This recipe fine-tunes the
model so that it does, while its final predictions stay those of the original:

    loss = sum_l w_l * KL(p_teacher || softmax(head(norm(h_l))))      over the exit layers l < L
         + final_weight * KL(p_teacher || softmax(head(norm(h_L))))   (keep the final layer the original's)
         + ce_weight * CE(next token)                                 (optional, off by default)

``p_teacher`` is the *frozen original* model's final distribution (no labels are needed). Weights
``w_l`` (``weighting``): "uniform" (default, every exit counts the same, so the early layers, the hard
ones, get as much gradient as the late ones), "depth" (w_l proportional to l, LayerSkip's scale that
favours late exits) or "early" (proportional to L - l). They are normalised to sum to ``exit_scale``.
``curriculum="gradual"`` (LayerSkip's gradual curriculum) switches exits on from the deepest to the
shallowest over the first half of training. ``layer_dropout`` skips decoder layer i of the student
with probability ``layer_dropout * i / (L - 1)`` (rising with depth, LayerSkip), never the first.

Memory: a readout over SmolLM2's 49k vocabulary is 200 kB per token in float32; each exit's readout
+ KL is checkpointed (recomputed in the backward pass) so only its (N, D) input stays alive, and the
teacher's logits are computed per micro-batch under no_grad. Keep micro-batches small and sequences
modest (256) and use gradient accumulation for a bigger batch.

The tied embeddings / output head are frozen by default (``train_head``): every readout, the final one
included, goes through the head, and moving it would move the teacher-matched final layer as well.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from exitwise.errors import DataError
from exitwise.heads.train import chunks, read_text, text_source, tokenize
from exitwise.models.backbone import Backbone
from exitwise.training.manifest import MANIFEST

WEIGHTINGS = ("uniform", "depth", "early")
CURRICULA = ("none", "gradual")
CHECKPOINT_DIR = "checkpoint"


@dataclass
class FinetuneConfig:
    exit_layers: list[int] | None = None  # default: default_exit_layers(L)
    weighting: str = "uniform"
    exit_scale: float = 1.0  # sum of the exit layers' weights
    final_weight: float = 1.0  # KL at the last layer, keeps its predictions the original's
    ce_weight: float = 0.0  # LM cross-entropy on the text (0: pure self-distillation)
    curriculum: str = "none"
    layer_dropout: float = 0.0  # skip probability of the deepest layer (linear in depth)
    lora_rank: int = 0  # 0: full fine-tuning; > 0: LoRA on every linear layer, merged when saving
    lora_alpha: float | None = None  # default 2 * rank
    train_head: bool = False
    lr: float | None = None  # default 2e-5 full, 2e-4 LoRA
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # default 5% of max_steps (at least 1)
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of lr
    max_steps: int = 1000
    max_minutes: float | None = None  # also ends the cosine: progress = max(step / max_steps, time / budget)
    micro_batch: int = 1  # sequences per forward/backward
    grad_accum: int = 4  # micro-batches per optimiser step
    seq_len: int = 256
    seed: int = 0
    device: str = "cpu"
    bf16: bool | None = None  # None: bf16 autocast on CUDA (if supported), float32 on CPU
    save_every: int = 50  # optimiser steps between checkpoints (0: only at the end)
    self_generate: int = 0  # sequences sampled from the original model, added to the corpus
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the manifest (e.g. the CLI's data files)


def default_exit_layers(num_layers: int) -> list[int]:
    """Every 4th hidden state (every L/4-th for shallow models) below L, plus L/2.

    Early layers are included on purpose: they are the cheap drafts, and the deep ones improve for
    free from the shared final norm and head. 30 layers: [4, 8, 12, 15, 16, 20, 24, 28]."""
    step = 4 if num_layers >= 16 else max(1, num_layers // 4)
    layers = set(range(step, num_layers, step)) | ({num_layers // 2} if num_layers >= 2 else set())
    return sorted(x for x in layers if 1 <= x < num_layers)


def recommended_draft_layers(exit_layers: list[int], num_layers: int, count: int = 3) -> list[int]:
    """At most ``count`` trained exits at or above L/3, spread out: each exit check costs a full-vocab
    readout (more than three decoder layers of SmolLM2), so drafts should not check at every exit."""
    upper = [x for x in exit_layers if x >= num_layers // 3] or list(exit_layers)
    if len(upper) <= count:
        return upper
    picks = {upper[round(i * (len(upper) - 1) / (count - 1))] for i in range(count)} if count > 1 else {upper[0]}
    return sorted(picks)


def exit_weights(layers: list[int], num_layers: int, weighting: str, scale: float) -> list[float]:
    """Per exit layer loss weights summing to ``scale``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    raw = {"uniform": [1.0] * len(layers), "depth": [float(x) for x in layers],
           "early": [float(num_layers - x) for x in layers]}[weighting]
    total = sum(raw)
    return [scale * r / total for r in raw]


def active_exits(layers: list[int], curriculum: str, progress: float) -> list[bool]:
    """Which exits are on at training ``progress`` in [0, 1]; "gradual": deepest first, all by half-way."""
    if curriculum not in CURRICULA:
        raise ValueError(f"curriculum must be one of {CURRICULA}, got {curriculum!r}")
    if curriculum == "none" or not layers:
        return [True] * len(layers)
    n_on = min(len(layers), 1 + int(progress * 2 * len(layers)))
    order = sorted(range(len(layers)), key=lambda k: -layers[k])
    on = set(order[:n_on])
    return [k in on for k in range(len(layers))]


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` as progress goes to 1."""
    if step < warmup:
        return (step + 1) / warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return min_ratio + (1 - min_ratio) * cos


def kl_to_teacher(hidden: torch.Tensor, norm, head, teacher_logp: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """KL(p_teacher || readout(hidden)) per token, averaged: the readout is the model's final norm + head."""
    logits = head(norm(hidden)).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.kl_div(torch.log_softmax(logits, -1), teacher_logp, reduction="batchmean", log_target=True)


def ce_readout(hidden: torch.Tensor, norm, head, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(norm(hidden)).float(), targets)


# ------------------------------------------------------------------------------------------ data
def corpus(backbone: Backbone, texts: list[str | Path], seq_len: int) -> torch.Tensor:
    """(C, seq_len) chunks of all the text files' token streams (each file's ragged tail dropped)."""
    parts = []
    for path in texts:
        ids = tokenize(backbone, read_text(path))
        if len(ids) >= seq_len:
            parts.append(chunks(ids, seq_len))
    if not parts:
        raise DataError(f"the text files {[str(t) for t in texts]} hold no sequence of {seq_len} tokens")
    return torch.cat(parts)


@torch.inference_mode()
def self_generated(teacher: Backbone, data: torch.Tensor, n: int, seed: int, prompt_len: int = 16,
                   batch: int = 8) -> torch.Tensor:
    """``n`` sequences of data's length sampled (temperature 1) from the original model, each prompted
    with the first ``prompt_len`` tokens of a randomly drawn chunk: distillation text beyond the corpus.
    Short sequences are prompted with at most half their length (the model must write some of it)."""
    gen = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, data.shape[0], (n,), generator=gen)
    seq_len = data.shape[1]
    prompt_len = max(1, min(prompt_len, seq_len // 2))
    out = []
    torch.manual_seed(seed + 1)
    for i in range(0, n, batch):
        prompts = data[starts[i:i + batch], :prompt_len].to(teacher.device)
        ids = teacher.model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - prompt_len,
                                     min_new_tokens=seq_len - prompt_len,
                                     pad_token_id=teacher.tokenizer.pad_token_id if teacher.tokenizer else 0)
        out.append(ids[:, :seq_len].cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ model
def student_model(model: torch.nn.Module, cfg: FinetuneConfig):
    """The trainable model (LoRA-wrapped when ``lora_rank`` > 0) and its trainable parameters."""
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                          target_modules=targets, bias="none")
        peft_model = get_peft_model(model, lora)  # injects in place: model's Linear modules become LoRA layers
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(True)
    if not cfg.train_head:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    return model, [p for p in model.parameters() if p.requires_grad]


def plain_model(student, cfg: FinetuneConfig) -> torch.nn.Module:
    """A copy of the student as a plain transformers model (LoRA merged into the weights)."""
    if cfg.lora_rank > 0:
        return copy.deepcopy(student).merge_and_unload()
    return student


def _inner(student, cfg: FinetuneConfig) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (whose modules hold the LoRA layers)."""
    return student.base_model.model if cfg.lora_rank > 0 else student


def student_hidden(bb: Backbone, ids: torch.Tensor, keep: set[int], dropout: float,
                   rng: random.Random) -> dict[int, torch.Tensor]:
    """Hidden states at the ``keep`` indices of a differentiable pass (Backbone.run is inference-only);
    decoder layer i > 0 is skipped with probability ``dropout * i / (L - 1)`` (identity residual)."""
    state = bb._state(bb.embed_tokens(ids), torch.ones_like(ids), None, 0)
    h, L = state.hidden, bb.num_layers
    out: dict[int, torch.Tensor] = {}
    for i in range(L):
        if dropout > 0 and i > 0 and rng.random() < dropout * i / max(1, L - 1):
            pass  # skipped layer: the residual stream passes unchanged
        else:
            kind = bb.layer_types[i]
            h = bb.layers[i](h, attention_mask=state.masks[kind], position_embeddings=state.rope.get(kind),
                             position_ids=state.position_ids)
            h = h[0] if isinstance(h, tuple) else h
        if i + 1 in keep:
            out[i + 1] = h
    return out


# ------------------------------------------------------------------------------------------ state
@dataclass
class RunState:
    step: int = 0  # optimiser steps done
    micro: int = 0  # micro-batches consumed (position in the data order)
    tokens: int = 0
    seconds: float = 0.0  # training time over all runs (resumes included)
    losses: list[dict] = field(default_factory=list)  # every logged step


def save_checkpoint(out: Path, student, cfg: FinetuneConfig, opt, sched, state: RunState) -> None:
    """Trainable weights (safetensors), optimiser + schedule (torch.save, loaded back with
    weights_only=True) and the run state (JSON), written to a temp dir and renamed into place."""
    from safetensors.torch import save_file

    final = out / CHECKPOINT_DIR
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in student.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**asdict(state), "config": _config_json(cfg)}, indent=1))
    if final.exists():
        old = out / (CHECKPOINT_DIR + ".old")
        final.rename(old)
        tmp.rename(final)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(final)


def load_checkpoint(out: Path, student, opt, sched) -> RunState:
    from safetensors.torch import load_file

    ck = out / CHECKPOINT_DIR
    for name in ("trainable.safetensors", "optimizer.pt", "state.json"):
        if not (ck / name).is_file():
            raise DataError(f"--resume: {ck / name} is missing (no checkpoint of an earlier run in {out})")
    weights = load_file(str(ck / "trainable.safetensors"))
    params = dict(student.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise DataError(f"{ck / 'trainable.safetensors'}: parameters {unknown[:3]} are not in the model "
                        "(another model or LoRA setting?)")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
    # the run itself wrote this file; weights_only refuses anything but tensors and plain containers
    blob = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    raw = json.loads((ck / "state.json").read_text())
    return RunState(**{k: raw[k] for k in RunState.__dataclass_fields__})


def _config_json(cfg: FinetuneConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra")}


# ------------------------------------------------------------------------------------------ run
def finetune(base: Backbone, texts: list[str | Path], out: str | Path, cfg: FinetuneConfig | None = None,
             resume: bool = False, base_name: str | None = None) -> dict:
    """Fine-tune ``base`` (its weights change in place) on ``texts``; write a model directory to ``out``
    that ``load_model(out)`` loads, with the manifest ``exitwise_finetune.json``. Returns the manifest."""
    cfg = cfg or FinetuneConfig()
    out = Path(out)
    L = base.num_layers
    exits = sorted(set(cfg.exit_layers or default_exit_layers(L)))
    if not exits or exits[0] < 1 or exits[-1] >= L:
        raise ValueError(f"exit layers must lie in 1..{L - 1} (the last layer, {L}, is always trained), got {exits}")
    if not 0.0 <= cfg.layer_dropout < 1.0:
        raise ValueError(f"layer_dropout must lie in [0, 1), got {cfg.layer_dropout}")
    if cfg.micro_batch < 1 or cfg.grad_accum < 1 or cfg.seq_len < 2 or cfg.max_steps < 1:
        raise ValueError("micro_batch, grad_accum, max_steps must be >= 1 and seq_len >= 2")
    weights = exit_weights(exits, L, cfg.weighting, cfg.exit_scale)
    active_exits(exits, cfg.curriculum, 0.0)  # validates the name
    device = torch.device(cfg.device)
    bf16 = cfg.bf16 if cfg.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    lr = cfg.lr or (2e-4 if cfg.lora_rank > 0 else 2e-5)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.max_steps // 20)

    base.model.to(device)
    teacher = Backbone(copy.deepcopy(base.model).eval().requires_grad_(False), base.tokenizer, name=base.name)
    data = corpus(base, texts, cfg.seq_len)
    n_text = data.shape[0]
    if cfg.self_generate > 0:
        data = torch.cat([data, self_generated(teacher, data, cfg.self_generate, cfg.seed)])
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(cfg.seed))

    student, params = student_model(base.model, cfg)
    bb = Backbone(_inner(student, cfg), base.tokenizer, name=base.name)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    clock = {"progress": 0.0}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(clock["progress"], s, warmup, cfg.min_lr_ratio))
    state = load_checkpoint(out, student, opt, sched) if resume else RunState()
    out.mkdir(parents=True, exist_ok=True)

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=state.step, unit="step", desc="finetune", dynamic_ncols=True)
    rng = random.Random(cfg.seed * 1000003 + state.step)  # layer dropout draws, resumable
    per_micro = cfg.micro_batch * cfg.seq_len
    t_run, seconds0, stopped = time.perf_counter(), state.seconds, "max_steps"

    def progress() -> float:
        p = state.step / cfg.max_steps
        if cfg.max_minutes:
            p = max(p, state.seconds / (60 * cfg.max_minutes))
        return p

    while state.step < cfg.max_steps:
        state.seconds = seconds0 + time.perf_counter() - t_run
        if cfg.max_minutes is not None and state.seconds >= 60 * cfg.max_minutes:
            stopped = "max_minutes"
            break
        clock["progress"] = progress()
        on = active_exits(exits, cfg.curriculum, clock["progress"])
        opt.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            idx = [int(order[(state.micro + j) % len(order)]) for j in range(cfg.micro_batch)]
            state.micro += cfg.micro_batch
            ids = data[idx].to(device)
            for k, v in micro_step(bb, teacher, ids, exits, weights, on, cfg, bf16, rng).items():
                parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        state.step += 1
        state.tokens += per_micro * cfg.grad_accum
        state.seconds = seconds0 + time.perf_counter() - t_run
        state.losses.append({"step": state.step, "lr": opt.param_groups[0]["lr"],
                             **{k: round(v, 5) for k, v in parts.items()}})
        if bar is not None:
            run_tokens = state.tokens - (state.losses[0]["step"] - 1) * per_micro * cfg.grad_accum
            bar.set_postfix(loss=f"{parts['loss']:.3f}", final_kl=f"{parts['kl_final']:.3f}",
                            tok_s=f"{run_tokens / max(1e-9, time.perf_counter() - t_run):.0f}")
            bar.update(1)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.max_steps:
            save_checkpoint(out, student, cfg, opt, sched, state)
    if bar is not None:
        bar.close()
    save_checkpoint(out, student, cfg, opt, sched, state)  # a later --resume --max-steps N goes on from here
    manifest = {
        "format": 1, "recipe": "self-distilled layerskip", "base_model": base_name or base.name,
        "num_layers": L, "exit_layers": exits, "exit_weights": [round(w, 5) for w in weights],
        "draft_layers": recommended_draft_layers(exits, L),
        "steps": state.step, "tokens": state.tokens, "seconds": round(state.seconds, 1), "stopped": stopped,
        "data": {"files": [text_source(t) for t in texts], "sequences": n_text,
                 "self_generated": cfg.self_generate, "order_seed": cfg.seed},
        "config": {**_config_json(cfg), "exit_layers": exits, "lr": lr, "warmup_steps": warmup, "bf16": bf16},
        "loss_first": state.losses[0] if state.losses else None,
        "loss_last": state.losses[-1] if state.losses else None,
        **cfg.extra,
    }
    save_model_dir(plain_model(student, cfg), base.tokenizer, out, manifest)
    (out / "losses.json").write_text(json.dumps(state.losses))
    return manifest


def micro_step(bb: Backbone, teacher: Backbone, ids: torch.Tensor, exits: list[int], weights: list[float],
               on: list[bool], cfg: FinetuneConfig, bf16: bool, rng: random.Random) -> dict[str, float]:
    """Forward + backward of one micro-batch (gradients accumulate); returns its loss terms."""
    L = bb.num_layers
    dev = ids.device.type
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        teacher_logp = torch.log_softmax(teacher.logits(ids).float().flatten(0, 1), -1)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        keep = {x for x, o in zip(exits, on, strict=True) if o} | {L}
        hidden = student_hidden(bb, ids, keep, cfg.layer_dropout, rng)
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=ids.device)
        for x, w, o in zip(exits, weights, on, strict=True):
            if not o:
                continue
            # checkpoint: the (N, V) readout is recomputed in backward instead of kept, one exit at a time
            kl = checkpoint(kl_to_teacher, hidden[x].flatten(0, 1), bb.norm, bb.head, teacher_logp, bb.softcap,
                            use_reentrant=False)
            terms[f"kl_{x}"] = kl
            total = total + w * kl
        kl_final = checkpoint(kl_to_teacher, hidden[L].flatten(0, 1), bb.norm, bb.head, teacher_logp, bb.softcap,
                              use_reentrant=False)
        terms["kl_final"] = kl_final
        total = total + cfg.final_weight * kl_final
        if cfg.ce_weight > 0:
            ce = checkpoint(ce_readout, hidden[L][:, :-1].flatten(0, 1), bb.norm, bb.head, ids[:, 1:].flatten(),
                            use_reentrant=False)
            terms["ce"] = ce
            total = total + cfg.ce_weight * ce
    (total / cfg.grad_accum).backward()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def save_model_dir(model: torch.nn.Module, tokenizer, out: Path, manifest: dict) -> None:
    """HF save_pretrained of the model (safetensors) and tokenizer, then the manifest (written last:
    its presence says the directory is complete)."""
    (out / MANIFEST).unlink(missing_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
