"""The issue's targets judged from a gpu_check result, and the bench/README.md section built from it.

Targets are benchmark figures, never tests: a toy (CPU) run evaluates none of them, and a leg
that did not run leaves its targets "not evaluated" with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import common

README = common.BENCH_DIR / "README.md"
MARK_BEGIN, MARK_END = "<!-- GPU-CHECK:BEGIN -->", "<!-- GPU-CHECK:END -->"
HEADING = "## GPU check (python -m bench.gpu_check)"

# (leg, description, operator, threshold): from issue 23
STOCK_OVER_DA = 3.9  # FLOP limit 4.6, the paper measured 4.1
DA_OVER_STOCK512 = 1.02
TILED_2048_GB = 6.0
STAGE2_SAMPLES_PER_S = 12.0
PLAN_MEMORY_TOLERANCE = 0.15


def _not_evaluated(description: str, why: str) -> dict[str, Any]:
    return {"target": description, "measured": None, "met": None, "why": why}


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 23, judged from ``result`` (the JSON :mod:`.cli` writes)."""
    legs = result.get("legs", {})
    toy = result.get("toy", True)
    targets = []

    def judge(leg: str, description: str, value_of, op: str, threshold: float) -> None:
        text = f"{description} {op} {threshold}"
        data = legs.get(leg)
        if toy:
            targets.append(_not_evaluated(text, "toy run (tiny sizes on a CPU): GPU targets are not evaluated"))
        elif data is None or "error" in data:
            targets.append(_not_evaluated(text, f"leg {leg} {'failed' if data else 'did not run'}"))
        else:
            value = value_of(data)
            if value is None:
                targets.append(_not_evaluated(text, "not measured in this run"))
            else:
                targets.append(common.target(description, value, op, threshold))

    judge("sampling", "end to end stock-1024 / DA-1024 wall time", lambda d: d["ratios"]["stock_1024_over_da_1024"], ">=", STOCK_OVER_DA)
    judge("sampling", "end to end DA-1024 / stock-512 wall time", lambda d: d["ratios"]["da_1024_over_stock_512"], "<=", DA_OVER_STOCK512)
    judge("decode", "DA 2048 tiled decode peak GB (1e9 bytes, bf16)", _tiled_2048_gb, "<=", TILED_2048_GB)
    judge("decode", "out-of-memory errors in the decodes under the 8 GB cap", lambda d: _ooms(d.get("capped", {})), "<=", 0)
    judge("lowvram", "out-of-memory errors in the low-VRAM sequence", lambda d: _ooms(d.get("steps", {})), "<=", 0)
    batches = [str(b) for b in result.get("sizes", {}).get("train_batches", ())]
    for batch in batches:
        judge("training", f"stage-2 samples/s at 1024, micro-batch {batch}",
              lambda d, b=batch: d["stage2"].get(b, {}).get("samples_per_s"), ">=", STAGE2_SAMPLES_PER_S)
    runs = [(f"stage 2 micro-batch {b}", lambda d, b=b: d["stage2"].get(b)) for b in batches] + [("stage 1", lambda d: d["stage1"])]
    for name, pick in runs:
        judge("training", f"{name}: relative error of the planned memory", lambda d, p=pick: plan_memory_error(p(d)), "<=",
              PLAN_MEMORY_TOLERANCE)
    return targets


def _tiled_2048_gb(decode: dict[str, Any]) -> float | None:
    entry = decode.get("runs", {}).get("da_2048_tiled_bf16", {})
    gib = entry.get("peak_memory", {}).get("peak_gib")
    return None if gib is None else gib * 2**30 / 1e9


def _ooms(entries: dict[str, Any]) -> int | None:
    flags = [e["out_of_memory"] for e in entries.values() if "out_of_memory" in e]
    return sum(flags) if flags else None


def plan_memory_error(entry: dict[str, Any] | None) -> float | None:
    """Relative error of the plan's memory estimate against the measured peak (None if not measured)."""
    if not entry or not entry.get("peak_memory", {}).get("measured"):
        return None
    return abs(entry["peak_memory"]["peak_gib"] / entry["plan"]["memory_gib"] - 1)


# ---------------------------------------------------------------------------- README section
def _mem(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    if m.get("out_of_memory"):
        return "**out of memory**"
    if not m.get("measured"):
        return "not measured (CPU)"
    return f"{m['peak_gib']} GiB (+{m['rise_gib']} over the {m['baseline_gib']} held before)"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def section(result: dict[str, Any]) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"CPU only ({m['cpu']}, {m['cpu_cores']} cores)"
    lines = [f"Run: {m['date_utc']}, {where}, torch {m['torch']}, commit `{m['commit'][:10]}`"
             f"{' + uncommitted changes' if m.get('worktree_dirty') else ''}; command `{result['command']}`"
             f"{'; **toy sizes**: shows that the check runs, says nothing about a GPU' if result['toy'] else ''}", ""]
    legs = result["legs"]
    for leg, render in (("sampling", _sampling), ("decode", _decode), ("lowvram", _lowvram), ("training", _training)):
        data = legs.get(leg)
        if data is None:
            continue
        lines += [f"**{leg}**: failed: `{data['error']}`"] if "error" in data else render(data)
        if data.get("from_run"):
            lines.append(f"(this leg from the run of {data['from_run']}, kept by --merge)")
        lines.append("")
    lines += ["| target | measured | met |", "|---|---|---|"]
    for t in result["targets"]:
        met = {True: "met", False: "**not met**", None: f"not evaluated ({t.get('why', '')})"}[t["met"]]
        lines.append(f"| {t['target']} | {'-' if t['measured'] is None else t['measured']} | {met} |")
    return "\n".join(lines)


def _cap(cap: dict[str, Any]) -> str:
    return f"applied: ComfyUI saw {cap['comfy_free_gib_seen']} GiB free" if cap["applied"] else cap["why"]


def _tiles(v: dict[str, Any]) -> str:
    return f"{v['tiles']} tiles of {v['tile_cells']} cells (overlap {v['overlap_cells']})" if "tiles" in v else "-"


def _sampling(d: dict[str, Any]) -> list[str]:
    s = d["setup"]
    lines = [f"**End to end in ComfyUI** ({s['model']}; {s['sampler']}, {s['steps']} steps, CFG {s['cfg']}; "
             f"median of {s['timed_rounds']} interleaved rounds after a warm-up)", "",
             f"| variant | latent | weights | median {s['clock']} time | peak memory |", "|---|---|---|---|---|"]
    for name, v in d["variants"].items():
        lines.append(f"| {name} | {v['latent']} | {v['weight_dtype']} | {_s(v['median_s'])} | {_mem(v['peak_memory'])} |")
    r = d["ratios"]
    lines.append(f"\nstock-1024 / DA-1024 = **{r['stock_1024_over_da_1024']}**, DA-1024 / stock-512 = "
                 f"**{r['da_1024_over_stock_512']}**, DA-1024 fp8 / bf16 = {r['da_1024_fp8_over_bf16']}")
    return lines


def _decode(d: dict[str, Any]) -> list[str]:
    lines = ["**Decode** (stock SD3 VAE: ComfyUI's own; DA-VAE: the pack's VAE path)", "",
             "| decode | latent | tiles | time | peak memory |", "|---|---|---|---|---|"]
    for name, v in d["runs"].items():
        lines.append(f"| {name} | {v['latent']} | {_tiles(v)} | {_s(v.get('seconds'))} | {_mem(v['peak_memory'])} |")
    if d.get("ratios"):
        lines.append("\nDA / stock decode time at 1024: " + ", ".join(f"{k.rsplit('_', 1)[1]} **{v}**" for k, v in d["ratios"].items()))
    cap = d["cap"]
    lines += ["", f"Under the {cap['cap_gib']} GiB cap ({_cap(cap)}):", "",
              "| decode | tiles | ComfyUI fell back to tiles | peak memory |", "|---|---|---|---|"]
    lines += [f"| {name} | {_tiles(v)} | {'yes' if v.get('comfy_fell_back_to_tiles') else 'no'} | {_mem(v)} |"
              for name, v in d["capped"].items()]
    return lines


def _lowvram(d: dict[str, Any]) -> list[str]:
    cap = d["cap"]
    lines = [f"**Low VRAM** (cap {cap['cap_gib']} GiB, {_cap(cap)}; one sequence)", "",
             "| step | peak memory | weights on the device | pinned weights | ComfyUI's loader said |", "|---|---|---|---|---|"]
    for name, v in d["steps"].items():
        loaded = v.get("loaded")
        said = "; ".join(line.split(";")[0].split(":")[0] for line in v.get("comfy_loader", [])) or "-"
        lines.append(f"| {name} | {_mem(v)} | {loaded if loaded is not None else '-'} | {v.get('pinned', '-')} | {said} |")
    return lines


def _training(d: dict[str, Any]) -> list[str]:
    lines = ["**Training** (the trainers' own step through the loop kit; plan = `bench.plan` at "
             f"{d['stage1']['plan']['mfu']:.0%} of an {d['stage1']['plan']['gpu']})", "",
             "| run | samples/s | plan samples/s | peak memory | plan memory |", "|---|---|---|---|---|"]
    runs = [(f"stage 2, micro-batch {b}", e) for b, e in d["stage2"].items()] + [("stage 1, one step", d["stage1"])]
    for name, e in runs:
        lines.append(f"| {name} | {e['samples_per_s']} | {e['plan']['samples_per_s']} | {_mem(e['peak_memory'])} | "
                     f"{e['plan']['memory_gib']} GiB |")
    return lines


def write_readme(text: str, path: Path = README) -> None:
    """Replace the text between the GPU-CHECK markers (or append the section with them)."""
    common.replace_marked(path, text, MARK_BEGIN, MARK_END, HEADING)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.gpu_check.report [JSON]``: rebuild the README section from a result file
    (e.g. the one a GPU machine handed back, copied to bench/results/)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check.report", description=main.__doc__)
    ap.add_argument("json", type=Path, nargs="?", default=common.RESULTS_DIR / "gpu_check.json")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    result = json.loads(args.json.read_text())
    result["targets"] = evaluate(result)
    write_readme(section(result), args.readme)
    print(f"rebuilt the GPU-CHECK section of {args.readme} from {args.json}")


if __name__ == "__main__":
    main()
