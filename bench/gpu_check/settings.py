"""Sizes of one run: the real ones on a GPU, tiny ones for ``--toy`` (same code, CPU, seconds)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Sizes:
    toy: bool
    image: int  # "1024": the side the speed claims are about
    small_image: int  # "512": stock at the DA token count
    large_image: int  # "2048": the large decode
    steps: int
    cfg: float
    timed_rounds: int
    text_tokens: int  # ComfyUI's SD3 conditioning: 77 CLIP + 77 T5
    decode_tile: int  # latent cells of the DA-VAE's tiles
    decode_overlap: int
    cap_bytes: int  # the small card the low-VRAM legs pretend to be
    train_batches: tuple[int, ...]
    train_resolution: int
    train_timed_steps: int
    stage1_resolution: int


FULL = Sizes(toy=False, image=1024, small_image=512, large_image=2048, steps=20, cfg=4.5, timed_rounds=3, text_tokens=154,
             decode_tile=64, decode_overlap=8, cap_bytes=8 * GIB, train_batches=(8, 16), train_resolution=1024,
             train_timed_steps=3, stage1_resolution=1024)
TOY = Sizes(toy=True, image=64, small_image=32, large_image=128, steps=2, cfg=4.5, timed_rounds=1, text_tokens=8,
            decode_tile=4, decode_overlap=1, cap_bytes=8 * GIB, train_batches=(2, 4), train_resolution=128,
            train_timed_steps=1, stage1_resolution=32)


def sizes(toy: bool) -> Sizes:
    return TOY if toy else FULL
