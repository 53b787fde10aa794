"""Rebuild the results table in bench/README.md (and the PNGs) from bench/results/*.json.

    python -m bench.report            # table between the README markers + PNGs
    python -m bench.report --print    # only print the table

The PNG step lets a benchmark run under an interpreter without matplotlib (e.g. ComfyUI's
venv for the MMDiT path) and be plotted afterwards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from davae_core.atomic_files import write_text_atomic

from . import common

START, END = "<!-- results:start -->", "<!-- results:end -->"
GIB = 2**30


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _cpu(summary: dict[str, Any]) -> str:
    return _fmt_s(summary["cpu"]["median_s"]) if "cpu" in summary else "-"


def _mark(t: dict[str, Any]) -> str:
    return "met" if t["met"] else "**not met**"


def _machine_line(m: dict[str, Any]) -> str:
    where = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if m.get("gpu") else f"CPU only: {m['cpu']}, {m['cpu_cores']} cores"
    dirty = " + uncommitted changes" if m.get("worktree_dirty") else ""
    return f"{m['date_utc']}, {where}, torch {m['torch']}, commit `{m['commit'][:10]}`{dirty}"


def dit_rows(d: dict[str, Any]) -> list[str]:
    s, st = d["setup"], d["step_time"]
    rows = [
        f"| {name} ({s['image_tokens'][name]} image tokens) | {_fmt_s(v['median_s'])} | {_cpu(v)} | |" for name, v in st.items()
    ]
    rows += [f"| {t['target']} | {t['measured']} | | {_mark(t)} |" for t in d["targets"]]
    per_round = d["ratios"].get("da_1024_over_stock_512_per_round_median")
    if per_round is not None:
        q = d["ratios"].get("da_1024_over_stock_512_per_round_quartiles")
        noise = f" (quartiles {q[0]} to {q[1]})" if q else ""
        rows.append(f"| DA-1024 / stock-512, median of per-round ratios (check) | {per_round}{noise} | | |")
    rounds = f"{s['repeats']} interleaved rounds" + (f" + {s['pair_repeats']} of the DA-1024/stock-512 pair" if s.get("pair_repeats") else "")
    head = (
        f"**DiT step** ({s['implementation']}, {s['layers']}/24 layers, {s['dtype']}, batch {s['batch']}, "
        f"{s['text_tokens']} text tokens, medians of {rounds})"
    )
    return [head, "", "| variant / ratio | median wall | median CPU time | target |", "|---|---|---|---|", *rows]


def decode_rows(d: dict[str, Any]) -> list[str]:
    s = d["setup"]
    rows = [
        f"| {name} {s['size']}px {tuple(s['latents'][name][1:])} | {_fmt_s(v['median_s'])} ({_cpu(v)} CPU) "
        f"| {d['peak_memory'][name]['peak_gib']} GiB | |"
        for name, v in d["decode_time"].items()
    ]
    for side, e in d["large_decodes"].items():
        for mode in ("untiled", "tiled"):
            x = e.get(mode, {})
            if "seconds" in x:
                cpu = f" ({_fmt_s(x['cpu_seconds'])} CPU)" if "cpu_seconds" in x else ""
                rows.append(f"| DA {side}px {mode} | {_fmt_s(x['seconds'])}{cpu} | {x['peak_gib']} GiB (rise {x['rise_gib']}) | |")
            elif x:
                rows.append(f"| DA {side}px {mode} | - | {'out of memory' if x.get('out_of_memory') else x.get('skipped', '')} | |")
        if "tiled_over_untiled_peak" in e:
            rows.append(f"| DA {side}px tiled / untiled peak | {e['tiled_over_untiled_peak']} | | |")
    rows += [f"| {t['target']} | {t['measured']} | | {_mark(t)} |" for t in d["targets"]]
    head = f"**Decode** (SD3 VAE architecture, {s['dtype']}, median of {s['repeats']} interleaved rounds; tile {next(iter(d['large_decodes'].values()), {}).get('tile_cells', '-')} latent cells)"
    return [head, "", "| decode | time | peak memory | target |", "|---|---|---|---|", *rows]


def train_rows(d: dict[str, Any]) -> list[str]:
    s = d["setup"]
    rows = []
    for name, v in d["throughput"].items():
        x = s[name]
        size = f"{x['image_size']}px" if "image_size" in x else f"{x['image_tokens']} tokens, {x['model'].split(',')[1].strip()}"
        mem = d.get("peak_memory", {}).get(name, {}).get("peak_gib", "-")
        rows.append(f"| {name} ({size}, batch {x['batch']}) | {v['samples_per_s']} | {_fmt_s(v['median_s'])} ({_cpu(v)} CPU) | {mem} | |")
    rows += [f"| {t['target']} | {t['measured']} | | | {_mark(t)} |" for t in d["targets"]]
    head = f"**Training throughput** ({s['precision']}, median of {s['repeats']} interleaved steps)"
    return [head, "", "| stage | samples/s (wall) | step wall (CPU time) | peak GiB | target |", "|---|---|---|---|---|", *rows]


SECTIONS = {"dit_step_cost": dit_rows, "decode_cost": decode_rows, "train_throughput": train_rows}


def load(results_dir: Path) -> dict[str, dict[str, Any]]:
    return {name: json.loads((results_dir / f"{name}.json").read_text()) for name in SECTIONS if (results_dir / f"{name}.json").exists()}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for name, data in results.items():
        lines += [f"Run: {_machine_line(data['machine'])}", "", *SECTIONS[name](data)]
        notes = [v for k, v in data["setup"].items() if k.endswith("_note") and v and k != "text_tokens_note"]
        notes += [data["setup"].get("gpu_only_targets", "")]
        lines += ["", *[f"- {n}" for n in notes if n], ""]
    return "\n".join(lines).rstrip() + "\n"


def replot(results: dict[str, dict[str, Any]], results_dir: Path) -> None:
    from . import decode_cost, dit_step_cost, train_throughput

    plots = {"dit_step_cost": dit_step_cost.plot, "decode_cost": decode_cost.plot, "train_throughput": train_throughput.plot}
    for name, data in results.items():
        common.write_results(name, data, results_dir, plots[name])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=common.BENCH_DIR / "README.md")
    parser.add_argument("--print", action="store_true", help="print the table, change nothing")
    args = parser.parse_args(argv)
    results = load(args.results)
    if not results:
        raise SystemExit(f"no results in {args.results}: run a benchmark first (see bench/README.md)")
    text = table(results)
    if args.print:
        print(text)
        return
    readme = args.readme.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"{args.readme} has no {START} ... {END} markers to replace")
    before, rest = readme.split(START, 1)
    after = rest.split(END, 1)[1]
    write_text_atomic(args.readme, f"{before}{START}\n{text}{END}{after}")
    print(f"updated {args.readme}")
    replot(results, args.results)


if __name__ == "__main__":
    main()
