"""Self-supervised training of early-exit heads (Valade v2; docs/papers.md, "Self-supervised exit heads").

Loss = mean over heads of KL(softmax(z_L) || softmax(head_k(h_{l_k}))) at every position, z_L being
the frozen backbone's own final logits (temperature 1); ``loss="ce"`` uses cross-entropy to argmax z_L
(the v1 objective) instead. No dataset label is ever used.

What makes it fast on a CPU, and what we chose not to do:
* The backbone runs once per batch under ``inference_mode`` up to the last layer; the heads' inputs
  (the hidden states at their layers) and the teacher's final logits come out of that one pass.
  Training is one epoch over fresh text, so caching hidden states to disk would save nothing.
* The head norms are frozen copies (v2), so no gradient flows into a head's input: each head costs one
  (N x D) @ (D x V) forward and one weight-gradient matmul of the same size.
* The KL is over the full vocabulary. Restricting it to the teacher's top-K tokens (+ a rest bucket)
  would not remove the dominant cost, the head's full-vocabulary logits and their gradient, which
  the rest bucket and the normalisation need anyway; it only helps when teacher logits are cached.
* Heads are processed one after another (forward, loss, backward) so only one (N, V) logit tensor
  and its gradient are alive at a time.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from exitwise.errors import DataError
from exitwise.heads.model import ExitHeads

LOSSES = ("kl", "ce")


@dataclass
class TrainConfig:
    steps: int | None = None  # optimiser steps; default from ``tokens``
    tokens: int = 65536  # training tokens when ``steps`` is not given
    batch_size: int = 2  # sequences per step
    seq_len: int = 256
    lr: float = 3e-4
    loss: str = "kl"
    seed: int = 0
    max_minutes: float | None = None  # stop early (and say so) when the wall-clock budget is spent
    progress: bool = True


def read_text(path: str | Path) -> str:
    """The text of a training / calibration file, with clear errors for missing or empty files."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {p} not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"text file {p} is empty")
    return text


def text_source(path: str | Path) -> dict:
    """Name and sha256 of a text file, recorded in the heads' manifest as provenance."""
    p = Path(path)
    return {"name": p.name, "path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def tokenize(backbone, text: str) -> list[int]:
    if backbone.tokenizer is None:
        raise ValueError("reading text needs a tokenizer; pass token ids instead")
    return list(backbone.tokenizer(text)["input_ids"])


def chunks(token_ids: list[int], seq_len: int) -> torch.Tensor:
    """(C, seq_len) non-overlapping windows of the token stream (the ragged tail is dropped)."""
    n = len(token_ids) // seq_len
    if n == 0:
        raise DataError(f"text has {len(token_ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(token_ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.inference_mode()
def teacher_pass(backbone, heads: ExitHeads, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states at the head layers, each (N, D), and the final logits (N, V) for ids (B, T)."""
    state = backbone.start(ids.to(backbone.device))
    hidden = []
    for layer in heads.layers:
        hidden.append(backbone.run(state, layer).hidden.flatten(0, 1).float())
    backbone.run(state, backbone.num_layers)
    final = backbone.readout(state.hidden).flatten(0, 1).float()
    return hidden, final


@torch.inference_mode()
def final_hidden_pass(backbone, heads: ExitHeads, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states at the head layers and after the last layer (before the final norm), each (N, D)."""
    state = backbone.start(ids.to(backbone.device))
    hidden = [backbone.run(state, layer).hidden.flatten(0, 1).double() for layer in heads.layers]
    return hidden, backbone.run(state, backbone.num_layers).hidden.flatten(0, 1).double()


def fit_translators(backbone, heads: ExitHeads, data: torch.Tensor, batch_size: int = 4, ridge: float = 1e-3,
                    progress: bool = False) -> dict:
    """Least-squares start for translators: h + A_k h + b_k ~ h_L, the last layer's hidden state.

    Ridge regression of the residual h_L - h on [h, 1] over every token of ``data`` (C, T), each
    token weighted by 1 / mean(h_L^2) (the final norm divides by that scale, so tokens with huge
    hidden states, like the first position's attention sink, do not dominate). Needs only backbone
    passes and (D+1)^2 sums, no vocabulary-sized matmul: several times cheaper per token than a
    KL step, and on its own it already beats KL-trained linear heads (benchmarks/results/heads/heads_training.md).
    ``ridge`` is relative to the mean diagonal of the Gram matrix."""
    if heads.kind != "translator":
        raise ValueError("a least-squares fit needs translator heads (kind='translator')")
    d = backbone.hidden_size
    gram = [torch.zeros(d + 1, d + 1, dtype=torch.float64) for _ in heads.layers]
    cross = [torch.zeros(d + 1, d, dtype=torch.float64) for _ in heads.layers]
    t0 = time.perf_counter()
    batches = range(0, data.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, unit="batch", desc="least squares")
    for i in batches:
        hidden, last = final_hidden_pass(backbone, heads, data[i:i + batch_size])
        w = last.pow(2).mean(-1, keepdim=True).reciprocal().sqrt()
        for k, h in enumerate(hidden):
            x = torch.cat([h, torch.ones_like(h[:, :1])], 1) * w
            gram[k] += x.T @ x
            cross[k] += x.T @ ((last - h) * w)
    for k, (g, c) in enumerate(zip(gram, cross, strict=True)):
        lam = ridge * float(g.diagonal().mean())
        beta = torch.linalg.solve(g + lam * torch.eye(d + 1, dtype=torch.float64), c)  # (D+1, D)
        with torch.no_grad():
            heads.translators[k].weight.copy_(beta[:d].T)
            heads.translators[k].bias.copy_(beta[d])
    summary = {"tokens": int(data.numel()),
               "ridge": ridge, "seconds": round(time.perf_counter() - t0, 1)}
    heads.meta["least_squares"] = summary
    return summary


def head_loss(logits: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean per-token loss of head logits (N, V) against teacher logits (N, V)."""
    if loss == "kl":
        # KL(p_teacher || q_head) summed over the vocabulary, averaged over tokens ('batchmean')
        return F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(teacher, -1), reduction="batchmean",
                        log_target=True)
    return F.cross_entropy(logits, teacher.argmax(-1))


@torch.no_grad()
def evaluate_loss(backbone, heads: ExitHeads, ids: torch.Tensor, loss: str = "kl") -> list[float]:
    """Per-head mean loss on ids (C, T), without training."""
    hidden, final = teacher_pass(backbone, heads, ids)
    return [float(head_loss(heads.logits(k, h), final, loss)) for k, h in enumerate(hidden)]


def kl_and_grad(logits: torch.Tensor, teacher_logp: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-mean loss (K,) of logits (K, N, V) and its gradient d(sum_k loss_k)/d logits, in closed form.

    KL(p || softmax(z)) has gradient (softmax(z) - p) / N; cross-entropy to argmax p has
    (softmax(z) - onehot) / N. Writing it out instead of going through autograd keeps one (K, N, V)
    temporary alive instead of several (log-softmax, its exp, the KL terms and their gradients)."""
    n = logits.shape[1]
    q = torch.log_softmax(logits, -1)  # log q
    if loss == "kl":
        p = teacher_logp.exp()
        value = (p * (teacher_logp - q)).sum(-1).mean(-1)
        q.exp_().sub_(p)
    else:
        target = teacher_logp.argmax(-1)  # (N,)
        value = -q.gather(-1, target.expand(q.shape[0], -1)[..., None])[..., 0].mean(-1)
        q.exp_()
        q[:, torch.arange(n), target] -= 1
    return value, q.div_(n)


def train_heads(backbone, heads: ExitHeads, token_ids: list[int] | torch.Tensor,
                config: TrainConfig | None = None) -> dict:
    """Train ``heads`` in place on a token stream; returns (and stores in ``heads.meta``) a summary."""
    cfg = config or TrainConfig()
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    if cfg.lr <= 0 or cfg.batch_size < 1 or cfg.seq_len < 2:
        raise ValueError("lr must be > 0, batch size >= 1 and sequence length >= 2")
    data = token_ids if isinstance(token_ids, torch.Tensor) else chunks(list(token_ids), cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(data.shape[0], generator=gen)
    per_step = cfg.batch_size * data.shape[1]
    steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.tokens / per_step))
    available = data.shape[0] // cfg.batch_size
    if available == 0:
        raise DataError(f"text has {data.shape[0]} sequences, fewer than one batch of {cfg.batch_size}")
    opt = torch.optim.Adam(heads.trainable(), lr=cfg.lr)
    # constant rate after a short warm-up, then a linear decay over the last 20% of the steps
    warm = max(1, steps // 20)

    def rate(step: int) -> float:
        return min((step + 1) / warm, 1.0, max(0.05, (steps - step) / max(1, 0.2 * steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc="heads")
    history: list[list[float]] = []
    t0 = time.perf_counter()
    done_steps, stopped_early = 0, False
    heads.train()
    for step in range(steps):
        if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
            stopped_early = True
            break
        j = step % available  # wraps into a second epoch only if the text is too short
        batch = data[order[j * cfg.batch_size:(j + 1) * cfg.batch_size]]  # (B, T)
        hidden, final = teacher_pass(backbone, heads, batch)
        teacher_logp = torch.log_softmax(final, -1)
        del final
        opt.zero_grad(set_to_none=True)
        if heads.kind == "translator":  # all heads' logits in one matmul against the shared W_out
            logits = heads.logits_many([h.clone() for h in hidden])  # clone: out of inference mode for autograd
            with torch.no_grad():
                value, grad = kl_and_grad(logits.detach(), teacher_logp, cfg.loss)
            logits.backward(grad / len(hidden))
            losses = value.tolist()
            del logits, grad
        else:  # one head at a time: a single (N, V) logit tensor and its gradient alive
            losses = []
            for k, h in enumerate(hidden):
                logits = heads.logits(k, h)
                with torch.no_grad():
                    value, grad = kl_and_grad(logits.detach()[None], teacher_logp, cfg.loss)
                logits.backward(grad[0] / len(hidden))
                losses.append(float(value[0]))
                del logits, grad
        opt.step()
        sched.step()
        history.append(losses)
        done_steps += 1
        if bar is not None:
            rate_tok = done_steps * per_step / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}", tok_s=f"{rate_tok:.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    heads.eval()
    window = max(1, min(10, len(history) // 5))  # smooth the noisy per-batch losses
    first = [sum(col) / window for col in zip(*history[:window], strict=True)] if history else []
    last = [sum(col) / window for col in zip(*history[-window:], strict=True)] if history else []
    summary = {"kind": heads.kind, "loss": cfg.loss, "steps": done_steps, "tokens": done_steps * per_step,
               "seconds": round(time.perf_counter() - t0, 1), "stopped_early": stopped_early,
               "loss_first": [round(x, 4) for x in first], "loss_last": [round(x, 4) for x in last],
               "config": {k: v for k, v in asdict(cfg).items() if k != "progress"}}
    heads.meta["training"] = {**heads.meta.get("training", {}), **summary}
    return summary
