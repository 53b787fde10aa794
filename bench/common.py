"""Shared plumbing for the benchmarks: device choice, interleaved timing, peak memory, results.

Why interleaved: the machines these run on are often shared, so absolute times drift.
Running the compared variants round-robin inside one process and taking medians keeps
the *ratios* meaningful even when the absolute numbers are noisy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from davae_core.atomic_files import write_text_atomic

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# ------------------------------------------------------------------ command line
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default: 5 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per variant before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG results")
    return parser


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    return device


def default_repeats(args: argparse.Namespace, device: torch.device, gpu: int = 5, cpu: int = 3) -> int:
    return args.repeats if args.repeats is not None else (gpu if device.type == "cuda" else cpu)


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (how SD3.5 runs in practice), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timings(
    variants: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    progress: bool = True,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each variant, measured round-robin: ``{"wall": {name: [...]}, "cpu": {...}}``.

    Each round runs every variant once; the order rotates between rounds so no variant
    always follows the same neighbour (caches, allocator state, thermal drift).  ``cpu`` is
    this process's CPU time (all threads), which leaves out time spent waiting for a core on
    a shared machine; on a GPU only wall time means anything.
    """
    names = list(variants)
    total = (warmup + repeats) * len(names)
    done = 0

    def run(name: str) -> tuple[float, float]:
        nonlocal done
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        variants[name]()
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        done += 1
        if progress:
            print(f"  [{done}/{total}] {name}: {seconds:.3f} s wall, {cpu_seconds:.3f} s cpu", flush=True)
        return seconds, cpu_seconds

    for _ in range(warmup):
        for name in names:
            run(name)
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = run(name)
            times["wall"][name].append(wall)
            times["cpu"][name].append(cpu)
    return times


def ratio_clock(device: torch.device) -> str:
    """Which clock the ratios use: wall time on a GPU; on a CPU (often shared) process CPU time."""
    return "wall" if device.type == "cuda" else "cpu"


def summarize_clocks(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """``{name: {"median_s": wall median, ..., "cpu": {cpu summary}}}``."""
    out = {}
    for name, wall in times["wall"].items():
        out[name] = {**summarize(wall), "cpu": summarize(times["cpu"][name])}
    return out


def medians(times: dict[str, dict[str, list[float]]], clock: str) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times[clock].items()}


def summarize(times: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs_s": [round(t, 5) for t in times],
    }


def target(description: str, value: float, op: str, threshold: float) -> dict[str, Any]:
    met = value >= threshold if op == ">=" else value <= threshold
    return {"target": f"{description} {op} {threshold}", "measured": round(value, 4), "met": bool(met)}


# ------------------------------------------------------------------ memory
class _RSSSampler:
    """Peak resident memory of this process, sampled by a thread (torch allocations are
    invisible to tracemalloc).  A short allocation between samples can be missed."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.peak = self.baseline = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "_RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict that holds, after the block, the peak bytes in use and the rise above
    the bytes in use when the block started (weights etc.)."""
    result: dict[str, Any] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.update(method="torch.cuda.max_memory_allocated", baseline_bytes=before, peak_bytes=peak)
    else:
        import gc

        gc.collect()
        with _RSSSampler() as sampler:
            yield result
        result.update(method="process RSS sampled every 2 ms (psutil)", baseline_bytes=sampler.baseline, peak_bytes=sampler.peak)
    result["rise_bytes"] = result["peak_bytes"] - result["baseline_bytes"]
    result["peak_gib"] = round(result["peak_bytes"] / 2**30, 3)
    result["rise_gib"] = round(result["rise_bytes"] / 2**30, 3)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------ provenance
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "HEAD"),
        "worktree_dirty": bool(_git("status", "--porcelain")),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


# ------------------------------------------------------------------ results
def write_results(name: str, data: dict[str, Any], out_dir: Path, plot: Callable[[Any, dict[str, Any]], None]) -> None:
    """``out_dir/name.json`` always; ``out_dir/name.png`` when matplotlib is installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    write_text_atomic(json_path, json.dumps(data, indent=2) + "\n")
    print(f"wrote {json_path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    plot(ax, data)
    m = data["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores']} cores)"
    fig.suptitle(f"{name} - {where} - {m['commit'][:8]} - {m['date_utc']}", fontsize=8)
    fig.tight_layout()
    png_path = out_dir / f"{name}.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    print(f"wrote {png_path}")


def bar_plot(ax: Any, labels: list[str], values: list[float], ylabel: str, title: str, note: str = "") -> None:
    bars = ax.bar(labels, values, color="#4878d0")
    for bar, value in zip(bars, values):
        text = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(values, default=1) * 1.5)  # headroom for the note
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if note:
        ax.text(0.01, 0.98, note, transform=ax.transAxes, va="top", fontsize=7, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})


def replace_marked(path: Path, text: str, begin: str, end: str, heading: str) -> None:
    """Put ``text`` between the ``begin`` and ``end`` marker lines of ``path``; a file without them
    gets ``heading`` and the marked block appended."""
    readme = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in readme and end in readme:
        head, rest = readme.split(begin, 1)
        readme = head + block + rest.split(end, 1)[1]
    else:
        readme = readme.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    write_text_atomic(path, readme)


def clock_median(summary: dict[str, Any], clock: str) -> float:
    """Median seconds of a :func:`summarize_clocks` entry on the given clock."""
    return summary["cpu"]["median_s"] if clock == "cpu" and "cpu" in summary else summary["median_s"]


def print_targets(targets: list[dict[str, Any]]) -> None:
    for t in targets:
        print(f"  {'MET    ' if t['met'] else 'NOT MET'}  {t['target']}: measured {t['measured']}")
