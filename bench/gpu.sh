#!/usr/bin/env bash
# The SD 1.5-architecture benchmarks in one run, for a lent GPU (random weights: nothing to download).
#
#   bash bench/gpu.sh [OUTPUT_DIR]        # default: $OUT, else bench/results
#
# A machine without diffusers/peft/open_clip gets them from wheels in ./.whl (pip download them beforehand);
# each benchmark writes its table to OUTPUT_DIR/sd15_*.txt, so a run cut short keeps what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
if ! python3 -c "import diffusers, peft, open_clip" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/studio-site .whl/*.whl
    export PYTHONPATH="/tmp/studio-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/sd15_device.txt" 2>&1
python3 -m bench.train_memory --arch sd15 --size 512 --batch 1 --steps 5 > "$out/sd15_train_memory.txt" 2>&1
python3 -m bench.compose speed --arch sd15 --repeats 2 > "$out/sd15_compose_speed.txt" 2>&1
python3 -m bench.compose loaded --arch sd15 --repeats 5 > "$out/sd15_loaded.txt" 2>&1
grep -h "^|\|UNet\|model" "$out"/sd15_*.txt
