"""``exitwise finetune``: self-distilled LayerSkip-style fine-tuning (exitwise.training.finetune)."""

from __future__ import annotations

import argparse

from exitwise.cli.argtypes import (
    float_range,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_arg,
)
from exitwise.cli.engine_args import layer_list
from exitwise.cli.model_args import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model so its intermediate layers can exit (self-distilled, "
                                        "LayerSkip-style)")
    add_model_args(p, dtype="float32", dtypes=("float32",))  # training needs float weights
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 training text file(s)")
    p.add_argument("--out", required=True, help="output model directory (load it with --model DIR)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--max-steps", type=positive_int, default=1000, help="optimiser steps (default: 1000)")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop cleanly after this long (the model is still written; the cosine follows it)")
    p.add_argument("--exit-layers", type=layer_list, default=None,
                   help="hidden-state indices trained to exit (default: every 4th layer and L/2)")
    p.add_argument("--weighting", default="uniform", choices=("uniform", "depth", "early"),
                   help="exit loss weights: uniform (default), depth (LayerSkip, ~l) or early (~L-l)")
    p.add_argument("--exit-scale", type=non_negative_float, default=1.0,
                   help="sum of the exit layers' loss weights (default 1)")
    p.add_argument("--final-weight", type=non_negative_float, default=1.0,
                   help="weight of the last layer's KL (default 1)")
    p.add_argument("--ce-weight", type=non_negative_float, default=0.0,
                   help="LM cross-entropy on the text (default 0: off)")
    p.add_argument("--curriculum", default="none", choices=("none", "gradual"),
                   help="gradual: exits switch on deepest first, all by half-way (LayerSkip)")
    p.add_argument("--layer-dropout", type=float_range(0.0, 1.0, hi_open=True), default=0.0,
                   help="skip probability of the deepest layer, linear in depth (LayerSkip; default 0)")
    p.add_argument("--lora-rank", type=non_negative_int, default=0, help="LoRA rank (default 0: full fine-tuning)")
    p.add_argument("--train-head", action="store_true", help="also train the (tied) embeddings / output head")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default 2e-5 full, 2e-4 LoRA)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None, help="default: 5%% of --max-steps")
    p.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per forward/backward (default 1)")
    p.add_argument("--grad-accum", type=positive_int, default=4, help="micro-batches per optimiser step (default 4)")
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA with bf16 support, off on CPU)")
    p.add_argument("--save-every", type=non_negative_int, default=50,
                   help="optimiser steps between checkpoints (0: end only)")
    p.add_argument("--self-generate", type=non_negative_int, default=0, metavar="N",
                   help="also train on N sequences the original model samples from prompts in the text")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from exitwise import load_model
    from exitwise.training.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        exit_layers=args.exit_layers, weighting=args.weighting, exit_scale=args.exit_scale,
        final_weight=args.final_weight, ce_weight=args.ce_weight, curriculum=args.curriculum,
        layer_dropout=args.layer_dropout, lora_rank=args.lora_rank, train_head=args.train_head, lr=args.lr,
        warmup_steps=args.warmup_steps, max_steps=args.max_steps, max_minutes=args.max_minutes,
        micro_batch=args.micro_batch, grad_accum=args.grad_accum, seq_len=args.seq_len, seed=args.seed,
        device=args.device, bf16=args.bf16, save_every=args.save_every, self_generate=args.self_generate,
        progress=not args.no_progress)
    base = load_model(args.model, dtype=args.dtype)  # on the CPU; the training moves it to --device
    m = finetune(base, args.text, args.out, cfg, resume=args.resume, base_name=args.model)
    print(f"wrote {args.out}: {m['steps']} steps, {m['tokens']} tokens in {m['seconds']} s ({m['stopped']}); "
          f"exit layers {m['exit_layers']}, drafts at {m['draft_layers']}")
    return 0
