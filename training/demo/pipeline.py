"""The whole DA-VAE recipe at toy scale, on this CPU, with no downloaded weights.

    python -m davae_training.demo [--out demo_out] [--no-align] [--no-zero-init] [--no-schedule] [--train-base]
    python -m davae_training.demo --ablation [--seeds 3]  # the four rows of the paper's Table 5, at toy scale
    python -m davae_training.demo --long  # the steps that reach the texture targets (LONG_STEPS), in demo_out_long/

1. data: procedural images with structure at 64 px and detail that only exists at 128 px;
2. the "pretrained" models: a narrow SD3-layout VAE and SD3.5-layout DiT at the base resolution
   (64 px, 8x8 latents, 8x8 tokens of 1x1 patches), shipped with the package like a downloaded
   SD3 (``make_toy_base`` made them), or trained in the run with ``--train-base``;
3. stage 1: the DA-VAE from that VAE (128 px -> 32 x 8 x 8) with the tokenizer trainer;
4. stage 2: the warm-started DiT (zero-init P'/O', LoRA, w(n)) with the adapter trainer;
5. sampling through the DA path (128 px from 8x8 tokens) and the baseline (64 px from the same
   8x8 tokens, bicubic to 128), then a report: side-by-side image, loss curves, JSON metrics;
6. the scores: a toy GenEval (a small classifier trained here on the real images reads shape,
   shape colour and background colour, ``attribute_accuracy``, and at 128 px the caption's
   texture, ``texture_accuracy``: of real images, of the DA-VAE's reconstructions, of both
   paths' samples), the one-pixel detail energy relative to real images (``detail_energy_ratio``,
   1.0 is real; ``background_detail_energy_ratio`` over the background frame alone, where
   texture should not leak) and a multi-scale SWD.

Every phase leaves its result in ``--out`` and is skipped when it is already there, so an
interrupted demo resumes where it stopped.  With ``COMFYUI_PATH`` set it also runs the shipped
1024 workflow headlessly on tiny files (see ``comfyui_step``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from davae_core.structured_latent import vae_shift_scale

from .procedural_images import make_batch, write_folder

logger = logging.getLogger("davae_training.demo")

BASE_SIZE = 64  # the toy "pretrained" resolution; the DA path makes 2x that
EVAL_START = 1_000_000  # procedural indices of held-out images (training uses 0..)
# the toy base models the package ships (made by ``python -m davae_training.demo.make_toy_base``)
SHIPPED_BASE = Path(__file__).with_name("toy_sd3")


def token_grid() -> str:
    """Tokens per side for both paths: the base latent (BASE_SIZE / 8) over the toy DiT's patch."""
    from .toy_base_models import DIT_PATCH_SIZE

    side = BASE_SIZE // 8 // DIT_PATCH_SIZE
    return f"{side}x{side}"


Curve = tuple[list[int], list[float]]  # (training steps, values) of one loss


def per_step(values: list[float]) -> Curve:
    """A loss recorded at every step, as a curve over steps 1..n."""
    return list(range(1, len(values) + 1)), values


# the default's five minutes leave stage 1 short of drawing the texture; these steps reach it
LONG_STEPS = {"stage1_steps": 2700, "stage2_steps": 4800}
# a run's folder holds one run's stages: a later run with other steps must not reuse them
STEPS_FILE = "stage_steps.json"


@dataclass
class DemoConfig:
    out: str = "demo_out"
    seed: int = 0
    train_images: int = 512
    eval_images: int = 48
    train_base: bool = False  # False: the shipped toy base models; True: train them in this run
    base_vae_steps: int = 1000  # with train_base
    base_dit_steps: int = 1200
    stage1_steps: int = 900
    stage2_steps: int = 600
    batch_size: int = 8
    sample_steps: int = 20
    classifier_steps: int = 200
    guidance: float = 2.0
    shift: float = 1.0
    align: bool = True
    zero_init: bool = True
    schedule: bool = True
    threads: int | None = None

    @property
    def variant(self) -> str:
        off = [name for name, on in (("align", self.align), ("zero-init", self.zero_init), ("schedule", self.schedule)) if not on]
        return "full" if not off else "no-" + "-no-".join(off)


@dataclass
class PhaseTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        logger.info("== %s", name)
        result = fn()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        return result


# ------------------------------------------------------------------ phases
def text_conditioner():
    """The bag-of-words conditioner shared by the toy DiT and stage 2 (captions are word lists here)."""
    from ..stage2.text_conditioning import HashingTextConditioner

    return HashingTextConditioner(joint_attention_dim=64, pooled_dim=32, tokens=16)


def train_pretrained(folder: Path, train_images: int, vae_steps: int, dit_steps: int, batch_size: int, shift: float,
                     seed: int) -> None:
    """Train the toy VAE and DiT at 64 px on procedural images and save them as a diffusers folder
    ``folder/{vae,transformer}`` with their loss curves in ``folder/losses.json``."""
    from .toy_base_models import normalised_latents, train_base_dit, train_base_vae

    images, captions = make_batch(0, train_images, 2 * BASE_SIZE, seed)
    low = F.interpolate(images, size=BASE_SIZE, mode="bicubic", align_corners=False).clamp(0, 1)
    vae = train_base_vae(low, steps=vae_steps, batch_size=batch_size, seed=seed)
    vae.model.save_pretrained(folder / "vae")
    text = text_conditioner()
    embeds, pooled = text.encode(captions)
    null_e, null_p = text.encode([""])
    dit = train_base_dit(normalised_latents(vae.model, low), embeds, pooled, null_e, null_p, steps=dit_steps,
                         batch_size=batch_size, shift=shift, seed=seed)
    dit.model.save_pretrained(folder / "transformer")
    losses = {"base VAE": [round(v, 5) for v in vae.losses], "base DiT": [round(v, 5) for v in dit.losses]}
    (folder / "losses.json").write_text(json.dumps(losses))  # last: it marks the folder complete


def make_pretrained(cfg: DemoConfig, root: Path, losses: dict[str, Curve]) -> Path:
    """The toy "pretrained" VAE and DiT: by default the ones shipped with the package (as SD3's would
    be downloaded); with ``--train-base`` trained here (or reused) in ``root/toy_sd3``."""
    folder = SHIPPED_BASE if not cfg.train_base else root / "toy_sd3"
    if not (folder / "losses.json").is_file():
        if not cfg.train_base:
            raise FileNotFoundError(f"the shipped toy base models are missing from {folder}; reinstall the package, "
                                    "or run with --train-base to train them here")
        train_pretrained(folder, cfg.train_images, cfg.base_vae_steps, cfg.base_dit_steps, 2 * cfg.batch_size,
                         cfg.shift, cfg.seed)
    losses.update({name: per_step(values) for name, values in json.loads((folder / "losses.json").read_text()).items()})
    return folder


def base_model_provenance(cfg: DemoConfig, folder: Path) -> dict[str, Any]:
    if not cfg.train_base:
        return {"source": "shipped", "path": str(folder), **json.loads((folder / "made_with.json").read_text())}
    return {"source": "trained in this run", "path": str(folder), "vae_steps": cfg.base_vae_steps,
            "dit_steps": cfg.base_dit_steps, "seed": cfg.seed, "train_images": cfg.train_images}


def run_stage1(cfg: DemoConfig, root: Path, data: Path, pretrained: Path) -> Path:
    from ..config import load_config
    from ..stage1.config import TokenizerTrainConfig
    from ..stage1.trainer import train

    run = root / ("stage1" if cfg.align else "stage1_no_align")
    exported = run / "davae.safetensors"
    if exported.is_file():
        return exported
    config = load_config(TokenizerTrainConfig, packaged_config("tokenizer_tiny.yaml"), [
        f"train.output_dir={run}", f"train.seed={cfg.seed}", f"train.max_steps={cfg.stage1_steps}",
        f"train.batch_size={cfg.batch_size}", "train.learning_rate=1.0e-3", "train.checkpoint_every=250",
        # 64 px crops of the 128 px images: the toy DA-VAE is fully convolutional, and four times the
        # steps for the same time teach it more than whole images do
        "train.log_every=10", "train.image_every=0", f"data.sources=[{data}]", f"data.resolution={BASE_SIZE}",
        f"model.pretrained_vae={pretrained / 'vae'}", f"loss.align_weight={1.0 if cfg.align else 0.0}",
        "loss.gan_start_step=100", "stats.num_images=64", f"export.path={exported}",
    ])
    return train(config, resume="latest" if any(run.glob("checkpoints/checkpoint-*")) else None)


def run_stage2(cfg: DemoConfig, root: Path, data: Path, pretrained: Path, davae_path: Path) -> Path:
    from ..config import load_config
    from ..stage2.config import AdapterTrainConfig
    from ..stage2.trainer import train

    run = root / f"stage2_{cfg.variant}"
    if (run / "final" / "summary.json").is_file():
        return run
    config = load_config(AdapterTrainConfig, packaged_config("adapter_tiny.yaml"), [
        f"train.output_dir={run}", f"train.seed={cfg.seed}", f"train.max_steps={cfg.stage2_steps}",
        f"train.batch_size={cfg.batch_size}", "train.learning_rate=5.0e-4", "train.checkpoint_every=100",
        "train.log_every=10", "train.image_every=0", "train.gradient_checkpointing=false",
        f"model.pretrained={pretrained}", "model.lora_rank=16", "model.lora_alpha=16", "model.ema_decay=0.99",
        f"model.heads_init={'zero' if cfg.zero_init else 'random'}",
        f"objective.shift={cfg.shift}", f"objective.detail_warmup_steps={cfg.stage2_steps // 2 if cfg.schedule else 0}",
        "text.standin_tokens=16", f"data.images.sources=[{data}]", f"data.images.resolution={2 * BASE_SIZE}",
        "data.images.random_flip=false", f"tokenizer.path={davae_path}", "sampling.prompts=[]",
        f"export.name=da_demo_{cfg.variant}",
    ])
    train(config, resume="latest" if any(run.glob("checkpoints/checkpoint-*")) else None)
    return run


def packaged_config(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / name


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def sample_both(cfg: DemoConfig, pretrained: Path, davae_path: Path, stage2_run: Path, captions: list[str]) -> dict[str, torch.Tensor]:
    """DA samples at 128 px and baseline samples at 64 px upsampled, from the same prompts and noise."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from davae_core import load_davae

    from ..stage2.run_file import load_run_for_export
    from ..stage2.sampler import sample_latents

    text = text_conditioner()
    embeds, pooled = text.encode(captions)
    null_e, null_p = text.encode([""])
    grid = BASE_SIZE // 8

    da_model, _, _ = load_run_for_export(stage2_run, "final", use_ema=True)
    davae = load_davae(davae_path)
    da_latents = sample_latents(da_model.eval(), embeds, pooled, null_e[0], null_p[0], (32, grid, grid), cfg.sample_steps,
                                cfg.guidance, cfg.shift, torch.Generator().manual_seed(cfg.seed))
    da_images = davae.decode(da_latents)

    base_dit = SD3Transformer2DModel.from_pretrained(pretrained / "transformer").eval()
    vae = AutoencoderKL.from_pretrained(pretrained / "vae").eval()
    base_latents = sample_latents(base_dit, embeds, pooled, null_e[0], null_p[0], (16, grid, grid), cfg.sample_steps,
                                  cfg.guidance, cfg.shift, torch.Generator().manual_seed(cfg.seed))
    shift, scale = vae_shift_scale(vae.config)
    raw = base_latents / scale + shift
    low = ((vae.decode(raw).sample + 1) / 2).clamp(0, 1)
    baseline = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    return {"da": da_images.clamp(0, 1), "baseline": baseline, "baseline_low": low}


@torch.no_grad()
def reconstruct(pretrained: Path, davae_path: Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The DA-VAE's and the toy VAE's reconstructions of ``images`` (see ``stage1.evaluate``)."""
    from diffusers import AutoencoderKL

    from davae_core import load_davae

    from ..stage1.evaluate import reconstruct_all

    return reconstruct_all(load_davae(davae_path), AutoencoderKL.from_pretrained(pretrained / "vae").eval(), images)


def reconstruction_metrics(recs: dict[str, torch.Tensor], images: torch.Tensor) -> dict[str, dict[str, float]]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    return {
        name: {"psnr": round(float(peak_signal_noise_ratio(rec, images, data_range=1.0)), 3),
               "ssim": round(float(structural_similarity_index_measure(rec, images, data_range=1.0)), 4)}
        for name, rec in recs.items()
    }


def attribute_classifier(cfg: DemoConfig, root: Path, losses: dict[str, Curve]):
    """The toy GenEval judge, trained (or reused) on the demo's real training images."""
    from safetensors.torch import load_file, save_file

    from .toy_classifier import AttributeClassifier, train_classifier

    path = root / f"toy_classifier_{cfg.train_images}_texture.safetensors"  # the name says it has the texture reader
    if path.is_file():
        model = AttributeClassifier()
        model.load_state_dict(load_file(path))
        return model.eval()
    images, captions = make_batch(0, cfg.train_images, 2 * BASE_SIZE, cfg.seed)
    trained = train_classifier(images, captions, steps=cfg.classifier_steps, seed=cfg.seed)
    save_file(trained.model.state_dict(), path)
    losses["toy classifier"] = per_step(trained.losses)
    return trained.model


def sample_scores(judge, samples: dict[str, torch.Tensor], real: torch.Tensor, captions: list[str],
                  recs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Attribute accuracy (real held-out images, and each path's samples against their own captions),
    texture accuracy (also of the DA-VAE's reconstructions of the real images, ``recs["davae"]``:
    stage 1 alone), and detail energy relative to the real images, over the whole image and over
    the background frame alone, all at 128 px."""
    from .detail_energy import detail_energy, detail_energy_ratio
    from .procedural_images import background_frame
    from .toy_classifier import attribute_scores, texture_accuracy

    by_attribute = {"real": attribute_scores(judge, real, captions)}
    by_attribute.update({name: attribute_scores(judge, samples[name], captions) for name in ("da", "baseline")})
    frame = background_frame(real.shape[-1])
    reconstruction = recs["davae"]
    # over the background, beside the DA-VAE's reconstructions and both paths' samples: what a
    # background can be expected to hold, the real images as the training PNGs store them (8 bits)
    # and the toy "pretrained" VAE's own reconstructions, which the DA-VAE's decoder starts from
    backgrounds = {"real_8bit": (real * 255).round() / 255, "stock_vae_full": recs["stock_full"],
                   "stock_vae_half_upsampled": recs["stock_half_upsampled"], "reconstruction": reconstruction,
                   "da": samples["da"], "baseline": samples["baseline"]}
    return {
        "attribute_accuracy": {name: scores["mean"] for name, scores in by_attribute.items()},
        "attribute_accuracy_by_attribute": by_attribute,
        "texture_accuracy": {"real": texture_accuracy(judge, real, captions),
                             "reconstruction": texture_accuracy(judge, reconstruction, captions),
                             **{name: texture_accuracy(judge, samples[name], captions) for name in ("baseline", "da")}},
        "detail_energy_ratio": {name: round(detail_energy_ratio(samples[name], real), 4) for name in ("da", "baseline")},
        # the real backgrounds are smooth gradients: their energy is tiny, so it is reported too; the
        # DA-VAE's reconstructions say how much of a leak stage 1 already makes
        "background_detail_energy_ratio": {name: round(detail_energy_ratio(images, real, frame), 4)
                                           for name, images in backgrounds.items()},
        "background_detail_energy_real": float(f"{detail_energy(real, frame):.4g}"),
    }


def generation_metrics(samples: dict[str, torch.Tensor], real: torch.Tensor, seed: int) -> dict[str, dict[str, float]]:
    from .swd import multiscale_swd

    return {name: {k: round(v, 4) for k, v in multiscale_swd(samples[name], real, seed=seed).items()} for name in ("da", "baseline")}


# ------------------------------------------------------------------ report
def tensorboard_scalars(run: Path, tag: str) -> Curve:
    """A scalar as the trainers logged it (every ``log_every`` steps), at the steps it was logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: list[tuple[int, float]] = []
    for events in sorted(run.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            values.extend((e.step, e.value) for e in acc.Scalars(tag))
    by_step = sorted(dict(values).items())
    return [s for s, _ in by_step], [v for _, v in by_step]


def plot_losses(curves: dict[str, Curve], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {k: v for k, v in curves.items() if v[1]}
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 2.8), squeeze=False)
    for ax, (name, (steps, values)) in zip(axes[0], shown.items()):
        ax.plot(steps, values, lw=1)
        ax.set_xlabel("step", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def side_by_side(real: torch.Tensor, samples: dict[str, torch.Tensor], path: Path, count: int = 6) -> Path:
    """Columns: a real 128 px image | baseline (64 px, bicubic) | DA (128 px), each with a label."""
    from PIL import Image, ImageDraw

    from ..images import to_uint8_image

    tokens = token_grid()
    columns = [("real 128 px", real), (f"baseline: 64 px, {tokens} tokens", samples["baseline"]),
               (f"DA-VAE: 128 px, {tokens} tokens", samples["da"])]
    size, label_h, pad = real.shape[-1] * 2, 18, 4  # shown at 2x so one-pixel detail is visible
    canvas = Image.new("RGB", (len(columns) * (size + pad) + pad, label_h + count * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (label, images) in enumerate(columns):
        x = pad + c * (size + pad)
        draw.text((x + 4, 3), label, fill=(0, 0, 0))
        for r in range(min(count, images.shape[0])):
            tile = Image.fromarray(to_uint8_image(images[r])).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (x, label_h + pad + r * (size + pad)))
    canvas.save(path)
    return path


# ------------------------------------------------------------------ ComfyUI (optional)
def comfyui_step(root: Path) -> dict[str, Any]:
    """With COMFYUI_PATH set, run the shipped 1024 workflow headlessly on tiny files."""
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        return {"skipped": "COMFYUI_PATH is not set"}
    try:
        from .comfyui_run import run_shipped_workflow
    except ImportError as e:  # the node pack's harness is optional for the demo
        return {"skipped": f"ComfyUI runner unavailable: {e}"}
    return run_shipped_workflow(Path(comfy), root / "comfyui")


# ------------------------------------------------------------------ main
def claim_folder(shared: Path, cfg: DemoConfig) -> None:
    """Record the stage steps of the run in ``shared``, or refuse a folder that holds another's:
    its finished stages would be skipped, and the report would describe steps that never ran."""
    steps = {"stage1_steps": cfg.stage1_steps, "stage2_steps": cfg.stage2_steps, "train_images": cfg.train_images}
    path = shared / STEPS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before != steps:
            raise SystemExit(f"{shared} holds a demo run with {before}, this one asks for {steps}: "
                             "give this run another --out (or delete that folder)")
    else:
        path.write_text(json.dumps(steps))


def run_demo(cfg: DemoConfig, share_root: Path | None = None) -> dict[str, Any]:
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    shared = share_root or root
    claim_folder(shared, cfg)
    timer = PhaseTimer()
    curves: dict[str, Curve] = {}

    data = shared / "data"
    if not (data / f"{cfg.train_images - 1:05d}.txt").is_file():
        timer.run("data", lambda: write_folder(data, cfg.train_images, 2 * BASE_SIZE, cfg.seed))
    pretrained = timer.run("pretrained toy VAE + DiT (64 px)", lambda: make_pretrained(cfg, shared, curves))
    davae_path = timer.run("stage 1: DA-VAE", lambda: run_stage1(cfg, shared, data, pretrained))
    stage2 = timer.run("stage 2: DA DiT", lambda: run_stage2(cfg, shared, data, pretrained, davae_path))

    real, captions = make_batch(EVAL_START, cfg.eval_images, 2 * BASE_SIZE, cfg.seed)
    samples = timer.run("sampling", lambda: sample_both(cfg, pretrained, davae_path, stage2, captions))
    recs = timer.run("reconstruction", lambda: reconstruct(pretrained, davae_path, real))
    recon = reconstruction_metrics(recs, real)
    generation = generation_metrics(samples, real, cfg.seed)
    judge = timer.run("toy classifier", lambda: attribute_classifier(cfg, shared, curves))
    scores = sample_scores(judge, samples, real, captions, recs)

    curves["stage 1 loss"] = tensorboard_scalars(davae_path.parent, "loss/total")
    curves["stage 2 base mse"] = tensorboard_scalars(stage2, "loss/base_mse")
    curves["stage 2 detail mse"] = tensorboard_scalars(stage2, "loss/detail_mse")
    report_dir = root / f"report_{cfg.variant}"
    report_dir.mkdir(exist_ok=True)
    files = {
        "side_by_side": str(side_by_side(real, samples, report_dir / "side_by_side.png")),
        "loss_curves": str(plot_losses(curves, report_dir / "loss_curves.png")),
    }
    report = {
        "variant": cfg.variant,
        "config": asdict(cfg),
        "tokens": {"da": token_grid(), "baseline": token_grid()},
        "base_models": base_model_provenance(cfg, pretrained),
        "reconstruction_128px": recon,
        **scores,
        "generation_swd_vs_real_128px": generation,
        "seconds": timer.seconds,
        "comfyui": comfyui_step(root),
        "files": files,
    }
    (report_dir / "report.json").write_text(json.dumps(report, indent=2))
    logger.info("report: %s", report_dir / "report.json")
    return report


ABLATION_COLUMNS = (  # (header, how to read it from a report)
    ("attribute acc. DA", lambda r: r["attribute_accuracy"]["da"]),
    ("attribute acc. baseline", lambda r: r["attribute_accuracy"]["baseline"]),
    ("texture acc. DA", lambda r: r["texture_accuracy"]["da"]),
    ("texture acc. DA-VAE rec.", lambda r: r["texture_accuracy"]["reconstruction"]),
    ("detail energy DA (1 = real)", lambda r: r["detail_energy_ratio"]["da"]),
    ("background detail energy DA (1 = real)", lambda r: r["background_detail_energy_ratio"]["da"]),
    ("detail energy baseline", lambda r: r["detail_energy_ratio"]["baseline"]),
    ("SWD DA (finest level)", lambda r: r["generation_swd_vs_real_128px"]["da"]["level0"]),
    ("SWD DA (mean)", lambda r: r["generation_swd_vs_real_128px"]["da"]["mean"]),
    ("DA-VAE PSNR", lambda r: r["reconstruction_128px"]["davae"]["psnr"]),
)


def ablation_table(reports: list[dict[str, Any]]) -> str:
    """One row per variant; with reports from several seeds, mean ± standard deviation over them,
    so a difference between rows can be weighed against the seed-to-seed spread."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        by_variant.setdefault(r["variant"], []).append(r)
    seeds = max(len(v) for v in by_variant.values())
    rows = ["| variant | seeds | " + " | ".join(h for h, _ in ABLATION_COLUMNS) + " |", "|---" * (len(ABLATION_COLUMNS) + 2) + "|"]
    for variant, runs in by_variant.items():
        cells = []
        for _, read in ABLATION_COLUMNS:
            values = torch.tensor([float(read(r)) for r in runs], dtype=torch.float64)
            cells.append(f"{values.mean():.4f} ± {values.std():.4f}" if len(values) > 1 else f"{values.item():.4f}")
        rows.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    if seeds > 1:
        shipped = all(r.get("base_models", {}).get("source") == "shipped" for r in reports)
        each = ("its own data and stage-1/stage-2 runs; the shipped toy base models are shared" if shipped
                else "its own data, toy base models and training runs")
        rows.append(f"\n± is the standard deviation over seeds (each seed: {each}).")
    return "\n".join(rows)


def run_ablation(cfg: DemoConfig, seeds: int) -> list[dict[str, Any]]:
    """The four rows of Table 5 for each seed; a seed's variants share its data, toy models and stage 1."""
    variants = [{}, {"align": False}, {"zero_init": False}, {"schedule": False}]
    reports = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        root = Path(cfg.out) if seeds == 1 else Path(cfg.out) / f"seed{seed}"
        for v in variants:
            reports.append(run_demo(DemoConfig(**{**asdict(cfg), **v, "seed": seed, "out": str(root)}), share_root=root))
    return reports


def parse_args(argv: list[str] | None = None) -> tuple[DemoConfig, bool, int]:
    ap = argparse.ArgumentParser(prog="python -m davae_training.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results folder (default demo_out, with --long demo_out_long)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-align", action="store_true", help="stage 1 without the detail alignment loss (Table 5 row 2)")
    ap.add_argument("--no-zero-init", action="store_true", help="stage 2 with randomly initialised P', O' (Table 5 row 3)")
    ap.add_argument("--no-schedule", action="store_true", help="stage 2 with w(n) = 1 from the start (Table 5 row 4)")
    ap.add_argument("--ablation", action="store_true", help="run the full recipe and all three ablations, sharing what they share")
    ap.add_argument("--seeds", type=int, default=1, help="with --ablation: repeat it for this many seeds (from --seed) and "
                    "report mean ± std, to tell real differences from seed noise")
    ap.add_argument("--train-base", action="store_true",
                    help="train the toy base VAE and DiT in this run (about 3 minutes) instead of using the shipped ones")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is faster when other jobs share the cores)")
    ap.add_argument("--quick", action="store_true", help="a fraction of the steps: checks the plumbing, not the method")
    ap.add_argument("--long", action="store_true", help="stage 1 %(stage1_steps)d and stage 2 %(stage2_steps)d steps: "
                    "what reaches the texture targets (about 18 minutes on a 2-core CPU)" % LONG_STEPS)
    args = ap.parse_args(argv)
    if args.long and args.quick:
        ap.error("--long and --quick pick opposite step counts: give one")
    out = args.out or ("demo_out_long" if args.long else "demo_out")
    cfg = DemoConfig(out=out, seed=args.seed, align=not args.no_align, zero_init=not args.no_zero_init,
                     schedule=not args.no_schedule, threads=args.threads, train_base=args.train_base)
    if args.long:
        cfg = DemoConfig(**{**asdict(cfg), **LONG_STEPS})
    if args.quick:
        cfg = DemoConfig(**{**asdict(cfg), "train_images": 32, "eval_images": 8, "base_vae_steps": 6, "base_dit_steps": 6,
                            "stage1_steps": 4, "stage2_steps": 4, "batch_size": 2, "sample_steps": 2,
                            "classifier_steps": 60})
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    return cfg, args.ablation, args.seeds


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg, ablation, seeds = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    if not ablation:
        report = run_demo(cfg)
        keys = ("variant", "reconstruction_128px", "attribute_accuracy", "texture_accuracy", "detail_energy_ratio",
                "background_detail_energy_ratio", "generation_swd_vs_real_128px", "seconds")
        print(json.dumps({k: report[k] for k in keys}, indent=2))
    else:
        table = ablation_table(run_ablation(cfg, seeds))
        (Path(cfg.out) / "ablation.md").write_text(table + "\n")
        print(table)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; results in {cfg.out}/")


if __name__ == "__main__":
    main()
