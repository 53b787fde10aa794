"""``python -m bench.gpu_check``: run the legs, write the JSON, rebuild the README section."""

from __future__ import annotations

import argparse
from dataclasses import asdict
import importlib
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from davae_core.atomic_files import write_text_atomic

from .. import common
from . import report
from .settings import sizes

# leg -> module; the order is the run order (the ComfyUI legs share one booted ComfyUI)
LEGS = {"sampling": "leg_sampling", "decode": "leg_decode", "lowvram": "leg_lowvram", "training": "leg_training"}
COMFY_LEGS = ("sampling", "decode", "lowvram")
NAME = "gpu_check"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    ap.add_argument("--toy", action="store_true", help="every leg on the CPU at tiny size (seconds): the check runs, nothing more")
    ap.add_argument("--legs", nargs="+", choices=list(LEGS), default=list(LEGS), help="which legs (default: all)")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="folder for gpu_check.json")
    ap.add_argument("--readme", type=Path, default=report.README, help="README whose GPU-CHECK section is rebuilt")
    ap.add_argument("--no-readme", action="store_true", help="leave the README alone")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def pick_device(toy: bool) -> torch.device:
    if toy:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device visible to torch {torch.__version__}: the full check needs a GPU (or --toy)")
    return torch.device("cuda")


def run_leg(name: str, run_sizes, device: torch.device) -> dict[str, Any]:
    """One leg; a failure is recorded (the other legs still run) and printed in full."""
    start = time.perf_counter()
    print(f"=== gpu_check leg {name}", flush=True)
    try:
        data = importlib.import_module(f"{__package__}.{LEGS[name]}").run(run_sizes, device)
    except Exception as error:  # noqa: BLE001 - an unattended GPU run should keep the other legs' figures
        traceback.print_exc()
        data = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
    data["leg_seconds"] = round(time.perf_counter() - start, 2)
    print(f"=== gpu_check leg {name}: {data['leg_seconds']} s{' (FAILED)' if 'error' in data else ''}", flush=True)
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    run_sizes = sizes(args.toy)
    device = pick_device(args.toy)
    torch.manual_seed(args.seed)
    legs = [leg for leg in LEGS if leg in args.legs]
    if any(leg in COMFY_LEGS for leg in legs):
        from .comfy_host import start

        start(device)  # before anything else touches CUDA: ComfyUI sets up its allocator options first
    start_time = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": NAME,
        "command": "python -m bench.gpu_check " + shlex.join(sys.argv[1:] if argv is None else argv),
        "toy": args.toy,
        "machine": common.machine_info(device),
        "sizes": asdict(run_sizes),
        "legs": {leg: run_leg(leg, run_sizes, device) for leg in legs},
    }
    result["total_seconds"] = round(time.perf_counter() - start_time, 2)
    result["targets"] = report.evaluate(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{NAME}.json"
    write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    if not args.no_readme:
        report.write_readme(report.section(result), args.readme)
        print(f"rebuilt the GPU-CHECK section of {args.readme}")
    common.print_targets([t for t in result["targets"] if t["met"] is not None])
    return result
