"""Decode cost: DA-VAE against the SD3 VAE at the same image size, then tiled large decodes.

    python -m bench.decode_cost                        # auto: 1024 + tiled 2048/4096 on GPU, smaller on CPU
    python -m bench.decode_cost --size 1024 --repeats 2 --tiled-sizes 2048

Both VAEs have the real SD3 architecture (davae_core.SD3_VAE_CONFIG) with random weights.
An image of side S is a (16, S/8, S/8) latent for the SD3 VAE and a (32, S/16, S/16) one
for the DA-VAE.  Targets (issue 6): DA decode time <= 1.1x the SD3 decode; a tiled 2048
decode within 6 GB on a GPU.  Peak memory: torch.cuda.max_memory_allocated on a GPU,
sampled process RSS on a CPU (approximate: the allocator may keep freed pages).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from diffusers import AutoencoderKL

from davae_core import DAVAE, SD3_VAE_CONFIG, DAVAEConfig

from . import common

NAME = "decode_cost"
GIB = 2**30


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="image side for the time comparison (default: 1024 GPU, 256 CPU)")
    parser.add_argument("--tiled-sizes", type=int, nargs="*", default=None, help="image sides decoded tiled (default: 2048 4096 GPU, 512 CPU)")
    parser.add_argument("--tile", type=int, default=None, help="tile in latent cells (default: 64 GPU, 16 CPU)")
    parser.add_argument("--overlap", type=int, default=None, help="tile overlap in latent cells (default: 8 GPU, 4 CPU)")
    parser.add_argument(
        "--max-untiled", type=int, default=None,
        help="largest side also decoded untiled for the memory comparison (default: 4096 GPU, 512 CPU)",
    )
    args = parser.parse_args(argv)

    device = common.pick_device(args.device)
    dtype = common.bench_dtype(device)
    gpu = device.type == "cuda"
    size = args.size or (1024 if gpu else 256)
    tiled_sizes = args.tiled_sizes if args.tiled_sizes is not None else ([2048, 4096] if gpu else [512])
    tile = args.tile or (64 if gpu else 16)
    overlap = args.overlap or (8 if gpu else 4)
    max_untiled = args.max_untiled or (4096 if gpu else 512)
    repeats = common.default_repeats(args, device, gpu=5, cpu=3)
    if size % 16:
        raise SystemExit(f"--size {size}: the DA-VAE needs a multiple of 16 pixels (e.g. {size // 16 * 16})")
    print(f"{NAME}: SD3-size VAEs, {dtype}, {device}, {size}px timed x{repeats}, tiled {tiled_sizes} (tile {tile}, overlap {overlap})")

    torch.manual_seed(args.seed)
    sd3 = AutoencoderKL(**SD3_VAE_CONFIG).to(device=device).eval()
    davae = DAVAE(DAVAEConfig(base_vae=dict(SD3_VAE_CONFIG)), with_base_encoder=False).to(device=device).eval()
    if dtype != torch.float32:
        sd3, davae = sd3.to(dtype=dtype), davae.to(dtype=dtype)
    factor = davae.layout.factor

    def latent(kind: str, side: int) -> torch.Tensor:
        if kind == "sd3":
            return torch.randn(1, 16, side // 8, side // 8, device=device, dtype=dtype)
        return torch.randn(1, davae.layout.channels, side // factor, side // factor, device=device, dtype=dtype)

    z_sd3, z_da = latent("sd3", size), latent("da", size)

    @torch.inference_mode()
    def decode_sd3() -> None:
        sd3.decode(z_sd3).sample

    @torch.inference_mode()
    def decode_da() -> None:
        davae.decode(z_da)

    times = common.interleaved_timings({"sd3_vae": decode_sd3, "da_vae": decode_da}, device, repeats, args.warmup)
    clock = common.ratio_clock(device)
    med = common.medians(times, clock)
    ratio = med["da_vae"] / med["sd3_vae"]
    targets = [common.target(f"DA / SD3 decode {clock} time at {size}px", ratio, "<=", 1.1)]

    memory = {}
    for name, fn in (("sd3_vae", decode_sd3), ("da_vae", decode_da)):
        with common.peak_memory(device) as mem:
            fn()
        memory[name] = mem
        print(f"  peak memory {name} {size}px: {mem['peak_gib']} GiB (rise {mem['rise_gib']} GiB)")

    large = {}
    for side in tiled_sizes:
        if side % factor:
            raise SystemExit(f"--tiled-sizes {side}: not a multiple of {factor}")
        z = latent("da", side)
        entry: dict[str, Any] = {"latent": list(z.shape), "tile_cells": tile, "overlap_cells": overlap}
        modes = [("tiled", lambda: davae.decode_tiled(z, tile=tile, overlap=overlap, progress=True))]
        if side <= max_untiled:
            modes.append(("untiled", lambda: davae.decode(z)))
        else:
            entry["untiled"] = {"skipped": f"larger than --max-untiled {max_untiled} (too slow / too much memory here)"}
        for mode, fn in modes:
            try:
                with common.peak_memory(device) as mem, torch.inference_mode():
                    common.synchronize(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    common.synchronize(device)
                    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
                entry[mode] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), **mem}
                print(f"  DA decode {side}px {mode}: {seconds:.2f} s, peak {mem['peak_gib']} GiB (rise {mem['rise_gib']} GiB)")
            except (RuntimeError, MemoryError) as error:
                if not common.is_out_of_memory(error):
                    raise
                entry[mode] = {"out_of_memory": True, "error": str(error).splitlines()[0][:200]}
                print(f"  DA decode {side}px {mode}: out of memory")  # peak_memory empties the cache before the next one
        untiled_peak = entry.get("untiled", {}).get("peak_bytes")
        if untiled_peak and "peak_bytes" in entry["tiled"]:
            entry["tiled_over_untiled_peak"] = round(entry["tiled"]["peak_bytes"] / untiled_peak, 4)
        large[str(side)] = entry
        if gpu and side == 2048 and "peak_bytes" in entry["tiled"]:
            targets.append(common.target("tiled 2048 DA decode peak GB (1e9 bytes, weights included)", entry["tiled"]["peak_bytes"] / 1e9, "<=", 6.0))

    result = {
        "benchmark": NAME,
        "machine": common.machine_info(device),
        "setup": {
            "architecture": "SD3 VAE (davae_core.SD3_VAE_CONFIG), random weights; DA-VAE built on it without its base encoder",
            "dtype": str(dtype).replace("torch.", ""),
            "size": size,
            "full_size": size == 1024,
            "size_note": "" if size == 1024 else f"decoded at {size}px instead of 1024 to keep the CPU run short; same architecture",
            "latents": {"sd3_vae": list(z_sd3.shape), "da_vae": list(z_da.shape)},
            "repeats": repeats,
            "warmup": args.warmup,
            "ratio_clock": clock,
            "timing": "interleaved rounds, order rotated per round, median; memory measured on separate untimed calls",
        },
        "decode_time": common.summarize_clocks(times),
        "ratios": {"da_over_sd3_decode_time": round(ratio, 4)},
        "peak_memory": memory,
        "large_decodes": large,
        "targets": targets,
    }
    if not gpu:
        result["setup"]["gpu_only_targets"] = "tiled 2048 within 6 GB is a GPU target: not evaluated on a CPU"
    common.write_results(NAME, result, args.out, plot)
    common.print_targets(targets)
    return result


def plot(ax, data: dict[str, Any]) -> None:
    fig = ax.figure  # two panels: replace the single axes write_results made
    ax.remove()
    left, right = fig.subplots(1, 2)
    size = data["setup"]["size"]
    clock = data["setup"].get("ratio_clock", "wall")
    labels = [f"{k} {size}" for k in data["decode_time"]]
    values = [common.clock_median(v, clock) for v in data["decode_time"].values()]
    note = f"{data['setup']['dtype']}\nDA/SD3 = {data['ratios']['da_over_sd3_decode_time']:.3f} (<= 1.1)"
    common.bar_plot(left, labels, values, f"median decode {clock} time (s)", "decode time", note)
    mem_labels, mem_values = [], []
    for side, entry in data["large_decodes"].items():
        for mode in ("untiled", "tiled"):
            if "peak_bytes" in entry.get(mode, {}):
                mem_labels.append(f"{side} {mode}")
                mem_values.append(entry[mode]["peak_bytes"] / GIB)
    if mem_labels:
        common.bar_plot(right, mem_labels, mem_values, "peak GiB", "DA decode peak memory", "process RSS" if clock == "cpu" else "")
        right.tick_params(axis="x", labelsize=7)


if __name__ == "__main__":
    main()
