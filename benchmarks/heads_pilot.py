"""Pilot runs for early-exit head training on cached hidden states (results:
benchmarks/results/heads/heads_training.md).

Step 1 (``cache``) runs SmolLM2-135M once over the first tokens of train.txt and test.txt and stores the
hidden states at layers 6/12/18/24 and 30 (before the final norm). Step 2 (``run``) trains one variant
on those cached states for a wall-clock budget and evaluates it on 4096 test tokens: per-head agreement
(argmax == the full model's), the oracle (some head agrees) and its mean exit layer (30 when no head
agrees), and max-coverage at alpha fitted on the test tokens themselves (optimistic; the calibrated,
held-out numbers come from ``exitwise heads calibrate``). Caching means a pilot pays for the head
matmuls only, not the backbone, so pilot minutes are not CLI minutes. Each run appends a JSON line.

    python benchmarks/heads_pilot.py cache --tokens 40960 --dir /tmp/hx
    python benchmarks/heads_pilot.py run NAME --kind translator --init lsw --lr 1e-3 --minutes 3 --batch 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LAYERS = [6, 12, 18, 24]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def cache(args) -> None:
    from exitwise.heads.train import chunks, read_text, tokenize
    from exitwise.models.loading import load_model

    bb = load_model("smollm2-135m")
    for name, n in (("test", 8192), ("train", args.tokens)):
        ids = tokenize(bb, read_text(DATA / f"{name}.txt")[: 16 * n])[:n]
        data = chunks(ids, 256)
        hs: list[list[torch.Tensor]] = [[] for _ in [*LAYERS, bb.num_layers]]
        with torch.inference_mode():
            for i in range(0, data.shape[0], 4):
                st = bb.start(data[i:i + 4])
                for j, layer in enumerate([*LAYERS, bb.num_layers]):
                    hs[j].append(bb.run(st, layer).hidden.flatten(0, 1).float().clone())
        torch.save({"ids": data, "hidden": torch.stack([torch.cat(h) for h in hs])}, Path(args.dir) / f"{name}.pt")


def run(args) -> None:
    from exitwise.models.loading import load_model

    bb = load_model("smollm2-135m")
    w_out = bb.head.weight.detach().float()  # (V, D)
    gamma, eps = bb.norm.weight.detach().float(), bb.norm.variance_epsilon

    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma

    h_train = torch.load(Path(args.dir) / "train.pt")["hidden"]
    h_test = torch.load(Path(args.dir) / "test.pt")["hidden"][:, :4096]
    k_heads, n, d = len(LAYERS), h_train.shape[1], h_train.shape[2]
    if args.kind == "translator":
        a, b = torch.zeros(k_heads, d, d), torch.zeros(k_heads, d)
        if args.init.startswith(("ls", "lsw")):  # least squares h + A h + b ~ h_L (lsw: weighted by 1/rms^2)
            nf = args.fit_tokens or n
            for k in range(k_heads):
                x = torch.cat([h_train[k, :nf], torch.ones(nf, 1)], 1).double()
                y = (h_train[-1, :nf] - h_train[k, :nf]).double()
                if args.init == "lsw":
                    wt = h_train[-1, :nf].double().pow(2).mean(-1, keepdim=True).rsqrt()
                    x, y = x * wt, y * wt
                gram = x.T @ x
                lam = 1e-3 * gram.diagonal().mean()
                sol = torch.linalg.solve(gram + lam * torch.eye(d + 1, dtype=torch.float64), x.T @ y)
                a[k], b[k] = sol[:d].T.float(), sol[d].float()
        a.requires_grad_()
        b.requires_grad_()
        params = [a, b]

        def logits_all(hs):
            return torch.stack([norm(hs[k] + hs[k] @ a[k].T + b[k]) for k in range(k_heads)]) @ w_out.T
    else:
        ws = [w_out.clone().requires_grad_() for _ in range(k_heads)]
        params = ws

        def logits_all(hs):
            return torch.stack([norm(hs[k]) @ ws[k].T for k in range(k_heads)])

    opt = torch.optim.Adam(params, lr=args.lr)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # token-level shuffle
    t0, step, hist = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < 60 * args.minutes and (step + 1) * args.batch <= n:
        idx = perm[step * args.batch:(step + 1) * args.batch]
        with torch.no_grad():
            logp = torch.log_softmax(norm(h_train[-1, idx]) @ w_out.T, -1)
        z = logits_all(h_train[:k_heads, idx])
        with torch.no_grad():  # closed-form KL gradient, as in exitwise.heads.train.kl_and_grad
            logq = torch.log_softmax(z.detach(), -1)
            kl = (logp.exp() * (logp - logq)).sum(-1).mean(-1)
            grad = (logq.exp() - logp.exp()) / args.batch
        opt.zero_grad(set_to_none=True)
        z.backward(grad)
        opt.step()
        hist.append(kl.tolist())
        step += 1
    minutes = (time.perf_counter() - t0) / 60
    with torch.no_grad():
        final = torch.cat([(norm(h_test[-1, i:i + 512]) @ w_out.T).argmax(-1) for i in range(0, 4096, 512)])
        preds, ents = [], []
        for i in range(0, 4096, 512):
            z = logits_all(h_test[:k_heads, i:i + 512])
            preds.append(z.argmax(-1))
            lp = torch.log_softmax(z, -1)
            ents.append(-(lp.exp() * lp).sum(-1))
    ok = torch.cat(preds, 1) == final
    ent = torch.cat(ents, 1)
    any_ok = ok.any(0)
    first = torch.where(any_ok, torch.tensor(LAYERS)[ok.int().argmax(0)], torch.tensor(bb.num_layers)).double()

    def coverage(e, c, alpha):
        acc = torch.cumsum(c[torch.argsort(e)].double(), 0) / torch.arange(1, len(e) + 1)
        good = torch.nonzero(acc >= alpha).flatten()
        return (int(good[-1]) + 1) / len(e) if len(good) else 0.0

    w = max(1, min(10, len(hist) // 5))
    res = {"name": args.name, "kind": args.kind, "lr": args.lr, "batch_tokens": args.batch, "init": args.init,
           "steps": step, "tokens": step * args.batch, "train_minutes": round(minutes, 2),
           "kl_first": [round(sum(c) / w, 3) for c in zip(*hist[:w], strict=True)],
           "kl_last": [round(sum(c) / w, 3) for c in zip(*hist[-w:], strict=True)] if hist else None,
           "agreement": [round(float(x), 4) for x in ok.double().mean(1)],
           "oracle": round(float(any_ok.double().mean()), 4), "mean_first_layer": round(float(first.mean()), 2),
           "insample_cov": {str(al): [round(coverage(ent[k], ok[k], al), 4) for k in range(k_heads)]
                            for al in (0.9, 0.95)}}
    print(json.dumps(res))
    with open(Path(args.dir) / "pilots.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--tokens", type=int, default=40960)
    c.add_argument("--dir", default="/tmp/hx")
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--kind", choices=["linear", "translator"], default="translator")
    r.add_argument("--init", choices=["zero", "ls", "lsw"], default="zero", help="translators: start")
    r.add_argument("--fit-tokens", type=int, default=None)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--minutes", type=float, default=3.0)
    r.add_argument("--batch", type=int, default=256, help="tokens per step")
    r.add_argument("--dir", default="/tmp/hx")
    args = p.parse_args()
    (cache if args.cmd == "cache" else run)(args)


if __name__ == "__main__":
    main()
