#!/usr/bin/env bash
# Prepare the carry for `python -m bench.gpu_check` on the lent GPU machine (bench/README.md, "GPU check").
# That machine has Python 3.12 with CUDA torch, accelerate, peft, transformers, safetensors, pyyaml and
# cannot reach any index: what it lacks travels in one ignored folder (named in the run's `carry`):
#   .gpu_check_carry/wheels/                  wheels, the versions the CPU test environments run
#   .gpu_check_carry/ComfyUI-0.8.0.tar.gz     ComfyUI from ../shared/comfyui, unpacked there (never committed)
# Everything that travels (checkout + carry) must stay under 64 MiB: this prints the total.
# Run from anywhere in the checkout; needs pip and network here.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${DAVAE_SHARED:-$PWD/../shared}
DEST=.gpu_check_carry
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >> "$EXCLUDE"
rm -rf "$DEST"
mkdir -p "$DEST/wheels"

# What ComfyUI imports in-process (its core, comfy_api, the nodes the legs use) and the training leg
# imports, and the machine lacks: the distributions behind sys.modules after a --toy run of every leg.
# Left out to stay under the size cap, as optional for this check: comfy-kitchen (67 MB; ComfyUI logs that
# quantised-checkpoint kernels are off; plain fp8_e4m3fn weights cast through comfy.ops without it),
# kornia and spandrel (only comfy_extras nodes the check never runs import them; ComfyUI skips those).
WHEELS=(
    av==18.1.0 torchsde==0.2.6 trampoline==0.1.2
    pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
    typing-inspection==0.4.5 python-dotenv==1.2.4
    diffusers==0.42.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 importlib_metadata==10.2.0
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DEST/wheels" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
cp "$SHARED/comfyui/ComfyUI-0.8.0.tar.gz" "$DEST/"
# the machine has no git: the check's JSON names the commit from here ("<hash> dirty" with uncommitted changes)
echo "$(git rev-parse HEAD)$([ -z "$(git status --porcelain)" ] || echo ' dirty')" > "$DEST/prepared_at_commit"

carry=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "carry $((carry / 1048576)) MiB + checkout $((tree / 1048576)) MiB = $(((carry + tree) / 1048576)) MiB (limit 64)"
[ $((carry + tree)) -lt $((64 * 1048576)) ] || { echo "over the 64 MiB a run may carry" >&2; exit 1; }
