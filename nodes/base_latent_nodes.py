"""DALatentFromBase / DABaseLatent: between 16-channel SD3 latents and DA latents."""

from __future__ import annotations

from comfy_api.latest import io

from .latent_ops import base_latent, latent_from_base


def _with_samples(latent: dict, samples) -> dict:
    out = {k: v for k, v in latent.items() if k != "noise_mask"}  # a mask's grid is only right for the old latent
    if "noise_mask" in latent and latent["noise_mask"].shape[-2:] == samples.shape[-2:]:
        out["noise_mask"] = latent["noise_mask"]
    out["samples"] = samples
    return out


class DALatentFromBase(io.ComfyNode):
    NODE = "SD3 Latent to DA Latent (2x)"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DALatentFromBase",
            display_name=cls.NODE,
            category="DA-VAE",
            is_experimental=True,
            description="Turns a 16-channel SD3 latent into a DA latent with zero detail, on the same grid: the latent "
            "of a 512x512 SD3 image becomes that of a 1024x1024 DA image. Sample it with a DA-patched model "
            "(denoise about 0.5-0.7) to refine a 512 result at 1024 for the token cost of 512.",
            inputs=[io.Latent.Input("samples", tooltip="SD3 / SD3.5 latent (16 channels), e.g. from a stock KSampler at 512x512.")],
            outputs=[io.Latent.Output(tooltip="DA latent (32 channels) of the 2x image, detail channels zero.")],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        return io.NodeOutput(_with_samples(samples, latent_from_base(cls.NODE, samples["samples"])))


class DABaseLatent(io.ComfyNode):
    NODE = "DA Latent to SD3 Latent (half size)"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DABaseLatent",
            display_name=cls.NODE,
            category="DA-VAE",
            is_experimental=True,
            description="Takes the 16 base channels out of a DA latent: an SD3 latent of the half-resolution image, which "
            "the stock SD3 VAE decodes (a 1024 DA latent previews at 512) and any SD3 node accepts.",
            inputs=[io.Latent.Input("samples", tooltip="DA latent (32 channels).")],
            outputs=[io.Latent.Output(tooltip="SD3 latent (16 channels) of the half-resolution image.")],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        return io.NodeOutput(_with_samples(samples, base_latent(cls.NODE, samples["samples"])))
