"""``python -m bench.gpu_check``: run the legs, write the JSON (after every leg, so a run cut short
keeps what it finished), rebuild the README section at the end."""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from davae_core.atomic_files import write_text_atomic
from davae_testing.checkout import register_davae_training

from .. import common
from . import report
from .settings import sizes

# leg -> module; the order is the run order (the ComfyUI legs share one booted ComfyUI)
LEGS = {"sampling": "leg_sampling", "decode": "leg_decode", "lowvram": "leg_lowvram", "training": "leg_training"}
COMFY_LEGS = ("sampling", "decode", "lowvram")
NAME = "gpu_check"
TOY_OUT = Path(tempfile.gettempdir()) / "gpu_check_toy"
PREPARED_AT = common.REPO_DIR / ".gpu_check_carry" / "prepared_at_commit"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    ap.add_argument("--toy", action="store_true",
                    help=f"every leg on the CPU at tiny size (seconds): the check runs, nothing more; writes to {TOY_OUT} "
                         "and leaves bench/README.md alone unless --out / --readme say otherwise")
    ap.add_argument("--legs", nargs="+", choices=list(LEGS), default=list(LEGS), help="which legs (default: all)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the legs of an existing gpu_check.json (same --toy) that this run does not run: rerun one leg")
    ap.add_argument("--out", type=Path, default=None, help=f"folder for gpu_check.json (default {common.RESULTS_DIR})")
    ap.add_argument("--readme", type=Path, default=None, help=f"README whose GPU-CHECK section is rebuilt (default {report.README})")
    ap.add_argument("--no-readme", action="store_true", help="leave the README alone")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = TOY_OUT if args.toy else common.RESULTS_DIR
    if args.readme is None:
        args.no_readme = args.no_readme or args.toy
        args.readme = report.README
    return args


def pick_device(toy: bool) -> torch.device:
    if toy:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device visible to torch {torch.__version__}: the full check needs a GPU (or --toy)")
    return torch.device("cuda")


def machine(device: torch.device) -> dict[str, Any]:
    """bench.common's machine line; on a machine without git (the lent GPU machine) the commit the
    carry was prepared at, which bench/gpu_check_prepare.sh writes."""
    info = common.machine_info(device)
    if info["commit"] == "unknown" and PREPARED_AT.is_file():
        info["commit"], _, dirty = PREPARED_AT.read_text().strip().partition(" ")
        info.update(worktree_dirty=dirty == "dirty", commit_source=f"{PREPARED_AT.name}, written by bench/gpu_check_prepare.sh")
    return info


def run_leg(name: str, run_sizes, device: torch.device, seed: int) -> dict[str, Any]:
    """One leg; a failure is recorded (the other legs still run) and printed in full."""
    start = time.perf_counter()
    print(f"=== gpu_check leg {name}", flush=True)
    try:
        data = importlib.import_module(f"{__package__}.{LEGS[name]}").run(run_sizes, device, seed)
    except Exception as error:  # noqa: BLE001 - an unattended GPU run should keep the other legs' figures
        traceback.print_exc()
        data = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
    data["leg_seconds"] = round(time.perf_counter() - start, 2)
    print(f"=== gpu_check leg {name}: {data['leg_seconds']} s{' (FAILED)' if 'error' in data else ''}", flush=True)
    return data


def earlier_legs(path: Path, toy: bool) -> dict[str, Any]:
    """The legs of an earlier result at ``path`` taken with the same ``--toy``, each with its own run's machine line."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("toy") != toy:
        return {}
    return {leg: {**data, "from_run": data.get("from_run", earlier["machine"]["date_utc"])} for leg, data in earlier["legs"].items()}


def write(result: dict[str, Any], path: Path) -> None:
    result["targets"] = report.evaluate(result)
    write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    run_sizes = sizes(args.toy)
    device = pick_device(args.toy)
    torch.manual_seed(args.seed)
    legs = [leg for leg in LEGS if leg in args.legs]
    register_davae_training()  # the GPU machine runs the checkout as it is, not pip-installed
    if any(leg in COMFY_LEGS for leg in legs):
        from .comfy_host import start

        start(device)  # before anything else touches CUDA: ComfyUI sets up its allocator options first
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{NAME}.json"
    kept = earlier_legs(path, args.toy) if args.merge else {}
    start_time = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": NAME,
        "command": "python -m bench.gpu_check " + shlex.join(sys.argv[1:] if argv is None else argv),
        "toy": args.toy,
        "machine": machine(device),
        "sizes": asdict(run_sizes),
        "legs": {leg: data for leg, data in kept.items() if leg not in legs},
    }
    for leg in legs:
        result["legs"][leg] = run_leg(leg, run_sizes, device, args.seed)
        result["total_seconds"] = round(time.perf_counter() - start_time, 2)
        write(result, path)
    result["legs"] = {leg: result["legs"][leg] for leg in LEGS if leg in result["legs"]}  # run order, merged or not
    write(result, path)
    print(f"wrote {path}")
    if not args.no_readme:
        report.write_readme(report.section(result), args.readme)
        print(f"rebuilt the GPU-CHECK section of {args.readme}")
    common.print_targets([t for t in result["targets"] if t["met"] is not None])
    return result
