#!/usr/bin/env bash
# Run every benchmark, then rebuild the table in bench/README.md and the PNGs.
#
#   bench/run_all.sh                       # auto: GPU at full size when one is present, else reduced CPU runs
#   bench/run_all.sh --device cpu --repeats 2
#   COMFYUI_PATH=/path/to/ComfyUI COMFY_PYTHON=/path/to/comfy/venv/bin/python bench/run_all.sh
#
# Arguments are the options every benchmark shares (--device, --repeats, --warmup, --seed, --out).
# PYTHON picks the interpreter (default: python3).  With COMFYUI_PATH set, the DiT benchmark
# runs ComfyUI's MMDiT under COMFY_PYTHON (default: PYTHON); plots are drawn afterwards by
# PYTHON, so ComfyUI's venv needs no matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DIT_PY=$PY
if [ -n "${COMFYUI_PATH:-}" ]; then
    DIT_PY=${COMFY_PYTHON:-$PY}
fi

echo "== DiT step cost ($DIT_PY)"
"$DIT_PY" -m bench.dit_step_cost "$@"
echo "== decode cost"
"$PY" -m bench.decode_cost "$@"
echo "== training throughput"
"$PY" -m bench.train_throughput "$@"
echo "== README table and plots"
"$PY" -m bench.report
