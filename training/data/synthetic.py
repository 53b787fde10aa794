"""Build the paper's synthetic stage-2 dataset: images the base model makes from a prompt list.

    python -m davae_training.data.synthetic --pretrained /models/sd3.5-medium --prompts prompts.txt \\
        --out data/sd35m_synth --resolution 1024 [--per-prompt 1 --steps 28 --guidance 4.5 --seed 0]
    accelerate launch -m davae_training.data.synthetic ...   # ranks split the work

The paper fine-tunes on images SD3.5-Medium itself generated from DiffusionDB prompts
(``--generator sd3``), then 5k steps on FLUX images (``--generator flux --pretrained /models/FLUX.1-dev``,
the data of ``training/configs/sd35m_1024_realism.yaml``).  Prompts come from a ``.txt`` file (one per line) or a
``.jsonl`` file (a "prompt", "caption" or "text" field per line).  Output, readable by
:mod:`davae_training.data.images`/:mod:`davae_training.stage2.caption_cache` as a folder with sidecar captions::

    OUT/00000/000000.png   000000.txt (the prompt, kept as the caption)   000000.json (seed, settings)

Image ``i`` uses prompt ``i // per_prompt`` and seed ``seed + i``; existing images are skipped,
so an interrupted build resumes where it stopped, and files appear atomically.

The generator is injectable (``generator(prompts, seeds) -> list[PIL.Image]``):
:class:`PipelineGenerator` runs diffusers' ``StableDiffusion3Pipeline`` or ``FluxPipeline`` from a
local folder; :class:`StandinGenerator` is a **test stand-in** (smooth seeded noise, no model) for
machines without SD3 weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from davae_core.atomic_files import atomic_write
from davae_core.dtypes import DTYPES

logger = logging.getLogger("davae_training.synthetic")

ImageGenerator = Callable[[list[str], list[int]], list]
PER_FOLDER = 1000


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt list not found (a .txt with one prompt per line, or a .jsonl)")
    prompts: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            text = next((obj[k] for k in ("prompt", "caption", "text") if isinstance(obj, dict) and k in obj), None)
            if text is None:
                raise ValueError(f"{path}:{n}: no 'prompt', 'caption' or 'text' field")
            line = str(text).strip()
        prompts.append(line)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path}: holds no prompts")
    return prompts


# --generator -> the diffusers pipeline class that reads the --pretrained folder
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


class PipelineGenerator:
    """A diffusers text-to-image pipeline (``kind``: a key of PIPELINES) from a local folder, one seed per image."""

    def __init__(self, folder: str | os.PathLike, resolution: int = 1024, steps: int = 28, guidance: float = 4.5,
                 device: str = "cuda", dtype: torch.dtype = torch.bfloat16, pipeline=None, kind: str = "sd3"):
        if pipeline is None:
            import diffusers

            pipeline = getattr(diffusers, PIPELINES[kind]).from_pretrained(str(folder), torch_dtype=dtype)
        self.pipe = pipeline.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.resolution, self.steps, self.guidance = device, resolution, steps, guidance
        self.settings = {"model": str(folder), "pipeline": type(self.pipe).__name__, "resolution": resolution,
                         "steps": steps, "guidance": guidance}

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        return self.pipe(prompt=prompts, height=self.resolution, width=self.resolution, num_inference_steps=self.steps,
                         guidance_scale=self.guidance, generator=gens).images


class StandinGenerator:
    """TEST STAND-IN, not a model: smooth colour noise seeded by (prompt, seed)."""

    def __init__(self, resolution: int = 128):
        self.resolution = resolution
        self.settings = {"model": "standin (not a generative model)", "resolution": resolution}

    def __call__(self, prompts: list[str], seeds: list[int]) -> list:
        from PIL import Image

        out = []
        for prompt, seed in zip(prompts, seeds):
            key = int.from_bytes(hashlib.md5(f"{prompt}|{seed}".encode()).digest()[:8], "little")
            rng = np.random.default_rng(key)
            small = rng.random((8, 8, 3)) * 255
            img = Image.fromarray(small.astype(np.uint8)).resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
            out.append(img)
        return out


def image_path(out_dir: Path, i: int) -> Path:
    return out_dir / f"{i // PER_FOLDER:05d}" / f"{i:06d}.png"


def build_synthetic_dataset(prompts: Sequence[str], out_dir: str | os.PathLike, generator: ImageGenerator,
                            per_prompt: int = 1, seed: int = 0, batch_size: int = 1, rank: int = 0,
                            world_size: int = 1, settings: dict | None = None) -> int:
    """Generate the images of this rank that do not exist yet; returns how many were written."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    total = len(prompts) * per_prompt
    todo = [i for i in range(rank, total, world_size) if not image_path(out, i).is_file()]
    written = 0
    for b in tqdm(range(0, len(todo), batch_size), desc="synthesise", disable=rank != 0, dynamic_ncols=True):
        idx = todo[b : b + batch_size]
        batch_prompts = [prompts[i // per_prompt] for i in idx]
        images = generator(batch_prompts, [seed + i for i in idx])
        for i, prompt, img in zip(idx, batch_prompts, images):
            path = image_path(out, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"prompt": prompt, "seed": seed + i, **(settings or {})}
            path.with_suffix(".json").write_text(json.dumps(meta))
            path.with_suffix(".txt").write_text(prompt, encoding="utf-8")
            with atomic_write(path) as tmp:  # the image last: its presence means the sample is complete
                img.save(tmp, format="PNG")
            written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_training.data.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help=".txt (one per line) or .jsonl prompt list")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pretrained", default="", help="local diffusers folder of the --generator's pipeline")
    ap.add_argument("--generator", choices=[*PIPELINES, "standin"], default="sd3",
                    help="sd3: StableDiffusion3Pipeline (the main data), flux: FluxPipeline (the realism phase); "
                         "'standin' writes seeded noise images for smoke tests - not a model")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=4.5, help="4.5 suits SD3.5; FLUX.1-dev's default is 3.5")
    ap.add_argument("--per-prompt", type=int, default=1)
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    prompts = read_prompts(args.prompts, args.max_prompts)
    if args.generator == "standin":
        gen: ImageGenerator = StandinGenerator(args.resolution)
    else:
        if not args.pretrained:
            ap.error(f"--pretrained is required with --generator {args.generator}")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        gen = PipelineGenerator(args.pretrained, args.resolution, args.steps, args.guidance, device, DTYPES[args.dtype],
                                kind=args.generator)
    n = build_synthetic_dataset(prompts, args.out, gen, args.per_prompt, args.seed, args.batch_size, rank, world,
                                getattr(gen, "settings", None))
    print(f"rank {rank}: wrote {n} images to {args.out}")


if __name__ == "__main__":
    main()
