"""Make the toy base models the demo ships (its stand-ins for a downloaded SD3 VAE and SD3.5 DiT).

    python -m davae_training.demo.make_toy_base [--out training/demo/toy_sd3] [--vae-steps 4000] [--dit-steps 4000]

The demo's five minutes go to what DA-VAE adds (stage 1, stage 2, sampling, scores); the base
models it upgrades are "pretrained" once, here, with more steps than a demo run could afford,
and their folder is committed.  ``python -m davae_training.demo --train-base`` trains them in
the run instead, with fewer steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from .pipeline import SHIPPED_BASE, train_pretrained


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ap = argparse.ArgumentParser(prog="python -m davae_training.demo.make_toy_base", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=SHIPPED_BASE)
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--dit-steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "losses.json").unlink(missing_ok=True)  # the folder counts as complete only once it is rewritten
    train_pretrained(args.out, args.train_images, args.vae_steps, args.dit_steps, args.batch_size, shift=1.0, seed=args.seed)
    made_with = {
        "vae_steps": args.vae_steps, "dit_steps": args.dit_steps, "batch_size": args.batch_size,
        "train_images": args.train_images, "seed": args.seed, "seconds": round(time.perf_counter() - start),
        "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    (args.out / "made_with.json").write_text(json.dumps(made_with, indent=2) + "\n")
    print(json.dumps(made_with))


if __name__ == "__main__":
    main()
