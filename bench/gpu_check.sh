#!/usr/bin/env bash
# Paper-scale check for a machine with one GPU: BERT-base on a SQuAD subset, hf_oto HESSO against
# prune-then-finetune (and HESSO with widths in multiples of 8) at equal steps, then compressed vs dense GPU
# latency in bf16 at batch 1, 32 and 128, kernel by kernel and as a CUDA graph. Finishes within 10
# minutes on one H100 (a hard limit of 9.5 minutes stops it otherwise).
#
#   bash bench/gpu_check.sh                      # needs a GPU and a network (or the HF caches)
#   bash bench/gpu_check.sh --dry-run            # the same code path on CPU, tiny model and data
#   bash bench/gpu_check.sh --offline            # GPU, no network: pretrained MiniLM on the hard QA set
#   bash bench/gpu_check.sh --model /path/bert-base-uncased --dataset /path/squad-parquet
#
# Any other option goes to bench/gpu_check.py (--help lists them). Results: out/gpu_check/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LIMIT=${GPU_CHECK_LIMIT_S:-570}

die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH (set PYTHON=/path/to/python)"
"$PYTHON" - <<'PY' || die "the Python environment lacks what the check needs: pip install -e '.[bench]'"
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "datasets", "hf_oto", "tqdm") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing: {', '.join(missing)}")
PY

dry=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry=1; done
if [[ $dry == 0 ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader \
        || echo "gpu_check.sh: nvidia-smi not found; relying on torch to find the GPU" >&2
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
timeout --signal=INT --kill-after=20 "$LIMIT" "$PYTHON" bench/gpu_check.py "$@" || status=$?
if [[ $status == 124 || $status == 130 ]]; then
    die "stopped after ${LIMIT}s: lower --steps or --train_samples (GPU_CHECK_LIMIT_S sets the limit)"
fi
exit $status
