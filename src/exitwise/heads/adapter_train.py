"""Self-distilled training of a draft adapter (:mod:`exitwise.heads.adapter`): no labels, the backbone
frozen, the target the model's own next-token distribution.

Two phases, so the backbone runs once and the adapter trains for many epochs:

1. **Cache** (:func:`build_cache`): one teacher-forced pass of the backbone over the training text
   writes, per token, the hidden state entering each asked layer E (float16, (N, D)) and the full
   model's top-k next tokens with their log-probabilities renormalised over those k (int32 / float32,
   (N, k)), as ``.npy`` files (read back with ``allow_pickle=False``) beside a JSON manifest with the
   model fingerprint, layers, data, top-k and token count, which is checked before the arrays are
   trusted. The text is the training file itself (teacher forcing), not the model's own greedy
   continuations of prompts from it, which Kangaroo trains on: those would fit the drafts' real
   inputs better, at the cost of a generation pass per prompt.
2. **Train** (:func:`train_adapter`): KL(teacher top-k || adapter) through the model's frozen final
   norm and output head, scored on a *batch shortlist*: the union of the batch's teacher top-k ids.
   Each token's teacher mass sits on its own k ids; the other tokens' ids in the union are negatives
   its adapter logits are pushed down on. For SmolLM2 a 1024-token batch's union is a few thousand
   rows instead of 49,152, so a step costs a few percent of a full-vocabulary one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from exitwise.artifacts import (
    check_fingerprint,
    check_model,
    get_field,
    model_fingerprint,
    read_manifest,
    reading,
    write_json,
)
from exitwise.errors import DataError
from exitwise.heads.adapter import Adapter
from exitwise.heads.train import chunks
from exitwise.models.quantize import float_weight

CACHE_FORMAT = "exitwise-adapter-cache/1"
MANIFEST = "manifest.json"


def _hidden_file(layer: int) -> str:
    return f"hidden{layer}.npy"


# ------------------------------------------------------------------------------------------- cache
@torch.inference_mode()
def build_cache(backbone, token_ids: list[int], layers: list[int], out: str | Path, *, topk: int = 32,
                seq_len: int = 256, batch_size: int = 4, data: dict | None = None, progress: bool = True) -> dict:
    """One teacher-forced pass over ``token_ids`` writing the layer-E inputs and the teacher's top-k to
    the directory ``out`` (see the module docstring); returns the manifest."""
    layers = sorted({int(x) for x in layers})
    if not layers or not all(1 <= x < backbone.num_layers for x in layers):
        raise ValueError(f"cache layers must lie in 1..{backbone.num_layers - 1}, got {layers}")
    if not 1 <= topk <= backbone.vocab_size:
        raise ValueError(f"topk must be in 1..{backbone.vocab_size}, got {topk}")
    seqs = chunks(list(token_ids), min(seq_len, len(token_ids)))  # (C, T)
    n, d = seqs.numel(), backbone.hidden_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not pass for the old cache
    open_npy = np.lib.format.open_memmap
    hidden = {e: open_npy(out / _hidden_file(e), mode="w+", dtype=np.float16, shape=(n, d)) for e in layers}
    top_ids = open_npy(out / "topk_ids.npy", mode="w+", dtype=np.int32, shape=(n, topk))
    top_logp = open_npy(out / "topk_logp.npy", mode="w+", dtype=np.float32, shape=(n, topk))
    batches = range(0, seqs.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, unit="batch", desc="adapter cache")
    t0, row = time.perf_counter(), 0
    for i in batches:
        ids = seqs[i:i + batch_size]
        m = ids.numel()
        state = backbone.start(ids.to(backbone.device))
        for e in layers:
            h = backbone.run(state, e).hidden.flatten(0, 1).float()  # (m, D)
            if not bool(torch.isfinite(h.half()).all()):
                raise DataError(f"layer {e} hidden states overflow float16; the cache cannot hold them")
            hidden[e][row:row + m] = h.half().cpu().numpy()
        backbone.run(state, backbone.num_layers)
        logits = backbone.readout(state.hidden).flatten(0, 1).float()  # (m, V)
        val, idx = logits.topk(topk, dim=-1)
        top_ids[row:row + m] = idx.int().cpu().numpy()
        top_logp[row:row + m] = torch.log_softmax(val, -1).cpu().numpy()  # renormalised over the k
        row += m
    for arr in (*hidden.values(), top_ids, top_logp):
        arr.flush()
    manifest = {"format": CACHE_FORMAT, **model_fingerprint(backbone), "layers": layers, "tokens": n, "topk": topk,
                "seq_len": int(seqs.shape[1]), "data": data or {}, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(manifest, out / MANIFEST)  # last: a cache without a manifest is incomplete
    return manifest


def load_cache(path: str | Path, backbone, layer: int) -> dict:
    """The cached layer-``layer`` inputs (N, D) float16 and teacher top-k (N, k) of the cache at ``path``,
    checked against its manifest and ``backbone``: a cache for another model, layer or shape is refused."""
    root = Path(path)
    js = root / MANIFEST
    manifest = read_manifest(js, CACHE_FORMAT, "adapter cache manifest")
    check_fingerprint(manifest, js)
    check_model(manifest, backbone, f"adapter cache {js}")
    layers = get_field(manifest, "layers", list, js)
    if layer not in layers:
        raise DataError(f"{js}: the cache holds layers {layers}, not layer {layer}")
    n, k = get_field(manifest, "tokens", int, js), get_field(manifest, "topk", int, js)
    want = {_hidden_file(layer): ((n, backbone.hidden_size), np.float16),
            "topk_ids.npy": ((n, k), np.int32), "topk_logp.npy": ((n, k), np.float32)}
    arrays = {}
    for name, (shape, dtype) in want.items():
        f = root / name
        with reading(f, "adapter cache array"):
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        if a.shape != shape or a.dtype != dtype:
            raise DataError(f"{f}: array of shape {a.shape} {a.dtype}, the manifest {js} says "
                            f"{shape} {np.dtype(dtype)}")
        arrays[name] = a
    ids = torch.from_numpy(np.array(arrays["topk_ids.npy"])).long()
    if int(ids.min()) < 0 or int(ids.max()) >= backbone.vocab_size:
        raise DataError(f"{root / 'topk_ids.npy'}: token ids outside the vocabulary of {backbone.vocab_size}")
    return {"hidden": torch.from_numpy(np.array(arrays[_hidden_file(layer)])),
            "ids": ids, "logp": torch.from_numpy(np.array(arrays["topk_logp.npy"])),
            "manifest": manifest}


# ------------------------------------------------------------------------------------------ training
def shortlist_kl(adapter: Adapter, backbone, h: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor,
                 weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """KL(teacher || adapter) per token, on the batch shortlist (the union of the batch's teacher ids).

    h (n, D) layer-E inputs, ids / logp (n, k) the teacher's top-k and renormalised log-probs, weight
    (V, D) the output head. Returns (mean KL, fraction of tokens whose shortlist argmax is the teacher's)."""
    union, inverse = torch.unique(ids, return_inverse=True)  # (u,), (n, k) positions in the union
    x = backbone.norm(adapter(h))  # (n, D) the frozen final norm
    bias = backbone.head.bias
    z = x @ weight[union].T  # (n, u)
    if bias is not None:
        z = z + bias[union].float()
    if backbone.softcap is not None:
        z = torch.tanh(z / backbone.softcap) * backbone.softcap
    logq = torch.log_softmax(z, -1)
    kl = (logp.exp() * (logp - logq.gather(1, inverse))).sum(-1).mean()
    with torch.no_grad():
        agree = float((z.argmax(-1) == inverse[:, 0]).float().mean())
    return kl, agree


def train_adapter(backbone, adapter: Adapter, cache: dict, *, epochs: float = 20.0, batch_tokens: int = 1024,
                  lr: float = 1e-3, max_minutes: float | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Train ``adapter`` in place on a cache from :func:`load_cache`; returns (and stores in
    ``adapter.meta["training"]``) a summary. Adam, a short warm-up, then a cosine decay to 5% over
    whichever budget runs out first, the steps or ``max_minutes`` (so a run cut by the clock still
    ends at a low rate)."""
    if lr <= 0 or batch_tokens < 1 or epochs <= 0:
        raise ValueError("lr, batch_tokens and epochs must be > 0")
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    dev = adapter.device
    weight = float_weight(backbone.head).detach().to(dev)  # (V, D)
    hidden, ids, logp = cache["hidden"], cache["ids"], cache["logp"]
    n = hidden.shape[0]
    per_epoch = max(1, n // batch_tokens)
    steps = max(1, math.ceil(epochs * per_epoch))
    warm = max(1, steps // 50)
    adapter.requires_grad_(True)
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)

    def rate(step: int, elapsed: float) -> float:
        done = max(step / steps, elapsed / (60 * max_minutes) if max_minutes else 0.0)
        return min((step + 1) / warm, 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))

    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc=f"adapter E={adapter.layer}")
    history: list[tuple[float, float]] = []
    t0, done, stopped_early = time.perf_counter(), 0, False
    order = torch.randperm(n, generator=gen)
    adapter.train()
    for step in range(steps):
        elapsed = time.perf_counter() - t0
        if max_minutes is not None and elapsed > 60 * max_minutes:
            stopped_early = True
            break
        for group in opt.param_groups:
            group["lr"] = lr * rate(step, elapsed)
        j = step % per_epoch
        if j == 0 and step:
            order = torch.randperm(n, generator=gen)
        rows = order[j * batch_tokens:(j + 1) * batch_tokens]
        h = hidden[rows].to(dev).float()
        kl, agree = shortlist_kl(adapter, backbone, h, ids[rows].to(dev), logp[rows].to(dev), weight)
        opt.zero_grad(set_to_none=True)
        kl.backward()
        opt.step()
        history.append((float(kl.detach()), agree))
        done += 1
        if bar is not None:
            bar.set_postfix(kl=f"{history[-1][0]:.3f}", agree=f"{agree:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    adapter.eval()
    adapter.requires_grad_(False)
    window = max(1, min(50, len(history) // 5))  # smooth the per-batch noise

    def mean(part: list[tuple[float, float]], i: int) -> float:
        return round(sum(x[i] for x in part) / max(1, len(part)), 4)

    summary = {"steps": done, "epochs": round(done / per_epoch, 2), "cache_tokens": n,
               "tokens_seen": done * batch_tokens, "batch_tokens": batch_tokens, "lr": lr, "seed": seed,
               "seconds": round(time.perf_counter() - t0, 1), "stopped_early": stopped_early,
               "kl_first": mean(history[:window], 0), "kl_last": mean(history[-window:], 0),
               "agree_first": mean(history[:window], 1), "agree_last": mean(history[-window:], 1),
               "topk": int(ids.shape[1]), "loss": "kl on the batch's teacher top-k shortlist"}
    adapter.meta["training"] = {**adapter.meta.get("training", {}), **summary}
    return summary


# ---------------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate_adapter(backbone, adapter: Adapter, token_ids: list[int], *, seq_len: int = 256, batch_size: int = 4,
                     thresholds: tuple[float, ...] = (0.4, 0.6, 0.8)) -> dict:
    """Teacher-forced agreement on held-out text: how often the adapter's argmax (full vocabulary) is
    the full model's, against the plain readout of layer E, and per draft threshold the share of
    tokens confident enough to draft (``coverage``) and the agreement among those."""
    seqs = chunks(list(token_ids), min(seq_len, len(token_ids)))
    total, hit, plain = 0, 0, 0
    conf = {t: [0, 0] for t in thresholds}  # t -> [confident, confident and right]
    for i in range(0, seqs.shape[0], batch_size):
        state = backbone.start(seqs[i:i + batch_size].to(backbone.device))
        h = backbone.run(state, adapter.layer).hidden.flatten(0, 1).float()
        target = backbone.readout(backbone.run(state, backbone.num_layers).hidden).flatten(0, 1).argmax(-1)
        logits = backbone.readout(adapter(h)).float()
        top_p, guess = torch.softmax(logits, -1).max(-1)
        right = guess == target
        total += target.numel()
        hit += int(right.sum())
        plain += int((backbone.readout(h).argmax(-1) == target).sum())
        for t in thresholds:
            sure = top_p >= t
            conf[t][0] += int(sure.sum())
            conf[t][1] += int((sure & right).sum())
    return {"layer": adapter.layer, "tokens": total, "acceptance": round(hit / total, 4),
            "plain_readout": round(plain / total, 4),
            "thresholds": {f"{t:g}": {"coverage": round(c / total, 4), "acceptance": round(r / max(c, 1), 4)}
                           for t, (c, r) in conf.items()}}


def fit_adapter(backbone, text: str | Path, layer: int, *, tokens: int = 32768, cache: str | Path,
                cache_layers: list[int] | None = None, topk: int = 32, seq_len: int = 256,
                hidden: int | None = None, epochs: float = 20.0, batch_tokens: int = 1024, lr: float = 1e-3,
                max_minutes: float | None = None, seed: int = 0, progress: bool = True) -> Adapter:
    """A draft adapter at layer ``layer`` trained on the text file ``text`` (its first ``tokens`` tokens):
    the teacher cache in directory ``cache`` is reused when its manifest matches the text, layer, top-k,
    sequence length and token count, else built (with ``cache_layers`` too, so one teacher pass serves
    adapters at several layers); then :func:`train_adapter`. What ``exitwise heads train-adapter`` and
    ``benchmarks/speculate.py`` run."""
    from exitwise.heads.train import read_text, text_source, tokenize

    if not 1 <= layer < backbone.num_layers:
        raise DataError(f"adapter layer {layer} is outside 1..{backbone.num_layers - 1}")
    ids = tokenize(backbone, read_text(str(text)))[:tokens]
    data = text_source(str(text))
    cache = Path(cache)
    manifest = None
    if (cache / MANIFEST).is_file():
        old = read_manifest(cache / MANIFEST, CACHE_FORMAT, "adapter cache manifest")
        same = (old.get("data", {}).get("sha256") == data["sha256"] and layer in old.get("layers", [])
                and old.get("topk") == topk and old.get("seq_len") == seq_len
                and old.get("tokens") == len(ids) // seq_len * seq_len)
        manifest = old if same else None
    if manifest is None:
        layers = sorted({layer, *(cache_layers or [])})
        manifest = build_cache(backbone, ids, layers, cache, topk=topk, seq_len=seq_len, data=data)
        if progress:
            print(f"cached {manifest['tokens']} tokens of layers {layers} in {manifest['seconds']} s: {cache}")
    adapter = Adapter(backbone, layer, hidden, seed=seed)
    adapter.meta["training_data"] = {**data, "tokens": manifest["tokens"],
                                     "method": "teacher-forced text, teacher top-k cached"}
    train_adapter(backbone, adapter, load_cache(cache, backbone, layer), epochs=epochs, batch_tokens=batch_tokens,
                  lr=lr, max_minutes=max_minutes, seed=seed, progress=progress)
    return adapter
