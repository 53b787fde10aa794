"""Cost of one denoiser step of SD3.5-Medium: stock 1024, DA 1024, stock 512.

    python -m bench.dit_step_cost                 # auto: full depth on a GPU, 2 layers on a CPU
    python -m bench.dit_step_cost --layers 4 --text-tokens 154

DA 1024 runs the 32-channel 64x64 latent (32x32 tokens) through the same blocks as stock
512, plus the DA heads, fused as at inference (P+P' one conv over 32 channels, O+O' one
linear).  Targets: stock-1024 / DA-1024 >= 3.9 (issue 6) and DA-1024 / stock-512 <= 1.01
(issue 9, fused heads).  With COMFYUI_PATH set the model is ComfyUI's MMDiT (run with
ComfyUI's python), otherwise diffusers' SD3Transformer2DModel.  Random weights: cost only.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from . import common
from .sd3_models import SD3_TEXT_TOKENS, SD35M_CONFIG, HeadSwitch, build_comfy, build_diffusers, comfy_available, conditioning, forward

NAME = "dit_step_cost"
HEADS_NOTE = {
    "diffusers": "fused for inference: P+P' one conv over 32 channels, O+O' one linear (davae_core.heads.Fused*)",
    "comfy": (
        "the node pack's own patch (patch_sd3_model: DA forwards on P and O, fused, weights made under inference "
        "mode and loaded through ModelPatcher, so the fused-weight cache is keyed and hit as in ComfyUI)"
    ),
}
# name -> (latent channels, latent side, DA heads on)
VARIANTS = {
    "stock_1024": (16, 128, False),
    "da_1024": (32, 64, True),
    "stock_512": (16, 64, False),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 24 on GPU, 2 on CPU)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (a CFG step is batch 2)")
    parser.add_argument("--text-tokens", type=int, default=SD3_TEXT_TOKENS, help="text sequence length (333 = 77 CLIP + 256 T5)")
    parser.add_argument("--impl", choices=["auto", "diffusers", "comfy"], default="auto", help="auto: comfy when COMFYUI_PATH is set")
    parser.add_argument(
        "--pair-repeats", type=int, default=None,
        help="extra interleaved rounds of only da_1024 and stock_512 (default: 10 GPU, 6 CPU)",
    )
    args = parser.parse_args(argv)

    device = common.pick_device(args.device)
    dtype = common.bench_dtype(device)
    layers = args.layers or (SD35M_CONFIG["num_layers"] if device.type == "cuda" else 2)
    repeats = common.default_repeats(args, device)
    pair_repeats = args.pair_repeats if args.pair_repeats is not None else (10 if device.type == "cuda" else 6)
    impl = args.impl if args.impl != "auto" else ("comfy" if comfy_available() else "diffusers")
    print(f"{NAME}: {impl} SD3.5M, {layers}/24 layers, {dtype}, {device}, batch {args.batch}, {args.text_tokens} text tokens")

    build = build_comfy if impl == "comfy" else build_diffusers
    model = build(layers, device, dtype, args.seed)
    switch = HeadSwitch(model, impl, args.seed)
    cond = conditioning(args.batch, args.text_tokens, device, dtype)
    sigma = torch.full((args.batch,), 0.7, device=device, dtype=dtype)
    latents = {name: torch.randn(args.batch, c, s, s, device=device, dtype=dtype) for name, (c, s, _) in VARIANTS.items()}

    def step(name: str):
        channels, _, da = VARIANTS[name]

        def run() -> None:
            switch.use(da)
            with torch.inference_mode():
                out = forward(model, impl, latents[name], sigma, cond)
            assert out.shape[1] == channels, f"{name}: model returned {tuple(out.shape)}"

        return run

    times = common.interleaved_timings({name: step(name) for name in VARIANTS}, device, repeats, args.warmup)
    if pair_repeats:  # the 1.02 target is tighter than the noise of a few rounds: more rounds of the cheap pair
        print(f"  {pair_repeats} more rounds of da_1024 / stock_512")
        pair = common.interleaved_timings({n: step(n) for n in ("da_1024", "stock_512")}, device, pair_repeats, warmup=0)
        for kind, per_name in pair.items():
            for name, extra in per_name.items():
                times[kind][name] += extra
    clock = common.ratio_clock(device)
    med = common.medians(times, clock)
    ratio_stock_da = med["stock_1024"] / med["da_1024"]
    ratio_da_512 = med["da_1024"] / med["stock_512"]
    # each round's own ratio: neighbours in time share the machine's state, so these scatter less
    round_ratios = [a / b for a, b in zip(times[clock]["da_1024"], times[clock]["stock_512"])]
    targets = [
        common.target(f"stock-1024 / DA-1024 step {clock} time", ratio_stock_da, ">=", 3.9),
        common.target(f"DA-1024 / stock-512 step {clock} time (fused heads)", ratio_da_512, "<=", 1.01),
    ]
    full = layers == SD35M_CONFIG["num_layers"]
    result = {
        "benchmark": NAME,
        "machine": common.machine_info(device),
        "setup": {
            "implementation": "ComfyUI MMDiT" if impl == "comfy" else "diffusers SD3Transformer2DModel",
            "architecture": "SD3.5-Medium, random weights",
            "layers": layers,
            "full_depth": full,
            "depth_note": "" if full else (
                f"reduced depth: {layers} of 24 blocks (dual-attention share kept), so embedder/final-layer "
                "overhead weighs more than at full depth"
            ),
            "dtype": str(dtype).replace("torch.", ""),
            "batch": args.batch,
            "text_tokens": args.text_tokens,
            "text_tokens_note": "333 = 77 CLIP-L/G + 256 T5, diffusers' SD3 pipeline default",
            "image_tokens": {name: (s // 2) ** 2 for name, (_, s, _) in VARIANTS.items()},
            "latents": {name: [args.batch, c, s, s] for name, (c, s, _) in VARIANTS.items()},
            "repeats": repeats,
            "pair_repeats": pair_repeats,
            "warmup": args.warmup,
            "ratio_clock": clock,
            "heads": HEADS_NOTE[impl],
            "timing": (
                "interleaved rounds of all three, order rotated per round, then pair_repeats more rounds of "
                "da_1024 and stock_512 only; medians"
            ),
        },
        "step_time": common.summarize_clocks(times),
        "ratios": {
            "stock_1024_over_da_1024": round(ratio_stock_da, 4),
            "da_1024_over_stock_512": round(ratio_da_512, 4),
            "da_1024_over_stock_512_per_round_median": round(statistics.median(round_ratios), 4),
            "da_1024_over_stock_512_per_round_quartiles": [round(q, 4) for q in _quartiles(round_ratios)],
            "da_1024_over_stock_512_per_round": [round(r, 4) for r in round_ratios],
        },
        "targets": targets,
    }
    common.write_results(NAME, result, args.out, plot)
    common.print_targets(targets)
    return result


def _quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile: the noise band of the per-round ratios."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def plot(ax, data: dict[str, Any]) -> None:
    s = data["setup"]
    clock = s.get("ratio_clock", "wall")
    labels = list(data["step_time"])
    values = [common.clock_median(data["step_time"][k], clock) * 1000 for k in labels]
    r = data["ratios"]
    note = (
        f"{s['implementation']}, {s['layers']}/24 layers, {s['dtype']}, {s['text_tokens']} text tokens\n"
        f"stock-1024/DA-1024 = {r['stock_1024_over_da_1024']:.2f} (target >= 3.9)\n"
        f"DA-1024/stock-512 = {r['da_1024_over_stock_512']:.3f} (target <= 1.01, fused heads)"
    )
    common.bar_plot(ax, labels, values, f"median step {clock} time (ms)", "SD3.5M denoiser step", note)


if __name__ == "__main__":
    main()
