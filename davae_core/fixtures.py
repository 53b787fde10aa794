"""Write tiny random-weight models in the real architectures and file formats.

    python -m davae_core.fixtures OUT_DIR [--seed 0]

No SD3 weights can be downloaded here, so tests, the demo and the ComfyUI integration checks
run on these.  Every file is what the real thing would be, only narrow:

=================================  =====================================================
``sd3_vae/``                       diffusers AutoencoderKL folder (SD3 layout, 4 blocks)
``sd3_transformer/``               diffusers SD3Transformer2DModel folder (SD3.5-like:
                                   dual attention in block 0, RMS qk-norm)
``checkpoints/sd3_tiny.safetensors``  the same MMDiT in single-file checkpoint layout
                                   (``model.diffusion_model.*``) as ComfyUI loads it
``davae/davae_tiny.safetensors``   our DA-VAE, initialised from ``sd3_vae``
``davae/da_heads_tiny.safetensors``  our DA heads for ``sd3_transformer`` (small random)
``loras/lora_tiny.safetensors``    a PEFT LoRA with ``transformer.`` keys (stock loaders), on
                                   the authors' targets
``loras/lora_tiny_all_blocks.safetensors``  the same on every block linear (the paper's
                                   targets: context stream and ``ff.net.0.proj`` too)
``controlnet/sd3_controlnet_tiny.safetensors``  an SD3 ControlNet for the same MMDiT (diffusers'
                                   ``SD3ControlNetModel`` layout, as the SD3 ControlNets users
                                   download; ComfyUI's ControlNet loader reads it)
``parity/``                          the DA-VAE in the authors' layout, and inputs with this
                                   code's outputs, for the ComfyUI-built DA-VAE to match
``manifest.json``                  what was written, with shapes
=================================  =====================================================
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3ControlNetModel, SD3Transformer2DModel
from safetensors.torch import save_file

from .checkpoint import save_davae, save_heads
from .davae_model import DAVAE, tiny_vae_config
from .heads import DAHeads, heads_config_for_diffusers
from .mmdit_keys import SD3_LORA_TARGETS, SD3_LORA_TARGETS_ALL_BLOCKS, diffusers_to_mmdit

# SD3.5-Medium's shape rules at toy width: hidden = 64 * depth (ComfyUI detects depth that way).
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "caption_projection_dim": 128,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 64,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}



def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**tiny_vae_config(attention=True)).eval()


def tiny_transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**TINY_TRANSFORMER_CONFIG).eval()
    # diffusers zero-initialises some output layers; random values make every path observable
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
    return model


def tiny_controlnet(seed: int = 0) -> SD3ControlNetModel:
    """An SD3 ControlNet at the tiny transformer's widths (no dual attention, like SD3's)."""
    torch.manual_seed(seed)
    config = {k: v for k, v in TINY_TRANSFORMER_CONFIG.items() if k not in ("out_channels", "dual_attention_layers")}
    model = SD3ControlNetModel(**config).eval()
    with torch.no_grad():  # diffusers starts the control outputs at zero: random values make them observable
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
    return model


def random_heads(transformer: SD3Transformer2DModel, seed: int = 0, std: float = 0.02) -> DAHeads:
    heads = DAHeads(heads_config_for_diffusers(transformer))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return heads


def lora_state_dict(transformer: SD3Transformer2DModel, rank: int = 4, seed: int = 0, std: float = 0.02,
                    targets: tuple[str, ...] = SD3_LORA_TARGETS) -> dict[str, torch.Tensor]:
    """A LoRA on stage-2 targets, as ComfyUI's loaders read it (``transformer.`` prefix, alpha = rank)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = copy.deepcopy(transformer)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights="gaussian")
    inject_adapter_in_model(config, model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the LoRA actually change outputs
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}


PARITY_TILES = {"encode_tile": 64, "encode_overlap": 32, "decode_tile": 4, "decode_overlap": 2}


def _authors_layout(davae: DAVAE) -> dict[str, torch.Tensor]:
    """Our tiny DA-VAE's tensors under the authors' SD3 "diff" keys (see authors_import)."""
    renames = {"detail_trunk.": "vae.encoder.", "decoder_trunk.": "vae.decoder.", "detail_down.conv.": "dc_down.conv.",
               "decoder_up.conv.": "dc_up.conv.", "base_encoder.": "original_vae_model.vae.encoder."}
    out = {}
    for key, value in davae.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is not None:
            out[renames[prefix] + key[len(prefix):]] = value.contiguous()
    return out


@torch.no_grad()
def write_parity_references(davae: DAVAE, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Inputs and this code's encode/decode outputs (plain and tiled, ours and the authors' layout),
    in ComfyUI's conventions: images (B, H, W, 3) in [0, 1], latents as :mod:`.comfy_latent`."""
    from .authors_import import import_tokenizer
    from .comfy_latent import from_comfy_latent, to_comfy_latent

    out_dir.mkdir(parents=True, exist_ok=True)
    authors_file = out_dir / "authors_davae_tiny.safetensors"
    save_file(_authors_layout(davae), str(authors_file))
    authors = import_tokenizer(authors_file, vae_config=davae.config.base_vae)
    gen = torch.Generator().manual_seed(seed + 7)
    image = torch.rand(1, 3, 96, 128, generator=gen)
    latent = torch.randn(1, 32, 6, 8, generator=gen)
    t = PARITY_TILES

    def comfy_image(x01):
        return x01.movedim(1, -1).contiguous()

    ref = {"image": comfy_image(image), "latent": latent}
    for name, model in (("ours", davae.eval()), ("authors", authors)):
        norm = model.normalizer
        ref[f"{name}_encode"] = to_comfy_latent(model.encode_raw(image), norm)
        ref[f"{name}_decode"] = comfy_image((model.decode_raw(from_comfy_latent(latent, norm)) + 1) / 2)
        tiled = model.encode_tiled(image, tile=t["encode_tile"], overlap=t["encode_overlap"])
        ref[f"{name}_encode_tiled"] = to_comfy_latent(norm.denormalize(tiled), norm)
        normalised = norm.normalize(from_comfy_latent(latent, norm))
        ref[f"{name}_decode_tiled"] = comfy_image(model.decode_tiled(normalised, tile=t["decode_tile"], overlap=t["decode_overlap"]))
    info = {"authors_file": authors_file.name, "authors_vae_config": davae.config.base_vae, **t}
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out_dir / "reference.safetensors"))
    (out_dir / "reference.json").write_text(json.dumps(info, indent=2))
    return {"reference": "reference.safetensors", **info}


def write_fixtures(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"seed": seed, "files": {}}

    vae = tiny_vae(seed)
    vae.save_pretrained(out / "sd3_vae")
    manifest["files"]["sd3_vae"] = {"latent_channels": vae.config.latent_channels, "factor": 8}

    transformer = tiny_transformer(seed)
    transformer.save_pretrained(out / "sd3_transformer")
    manifest["files"]["sd3_transformer"] = dict(TINY_TRANSFORMER_CONFIG)

    ckpt = out / "checkpoints" / "sd3_tiny.safetensors"
    ckpt.parent.mkdir(exist_ok=True)
    mmdit = diffusers_to_mmdit({k: v.clone() for k, v in transformer.state_dict().items()})
    save_file({k: v.contiguous() for k, v in mmdit.items()}, str(ckpt))
    manifest["files"]["checkpoints/sd3_tiny.safetensors"] = {"tensors": len(mmdit), "layout": "model.diffusion_model.*"}

    davae = DAVAE.from_base_vae(vae)
    save_davae(davae, out / "davae" / "davae_tiny.safetensors", info={"fixture": True, "seed": seed})
    manifest["files"]["davae/davae_tiny.safetensors"] = {"channels": davae.layout.channels, "factor": davae.layout.factor}

    manifest["files"]["parity"] = write_parity_references(davae, out / "parity", seed)

    heads = random_heads(transformer, seed)
    save_heads(heads, out / "davae" / "da_heads_tiny.safetensors", info={"fixture": True, "seed": seed})
    manifest["files"]["davae/da_heads_tiny.safetensors"] = heads.config.to_dict()

    (out / "loras").mkdir(exist_ok=True)
    for name, targets in (("lora_tiny", SD3_LORA_TARGETS), ("lora_tiny_all_blocks", SD3_LORA_TARGETS_ALL_BLOCKS)):
        lora = lora_state_dict(transformer, seed=seed, targets=targets)
        save_file(lora, str(out / "loras" / f"{name}.safetensors"))
        manifest["files"][f"loras/{name}.safetensors"] = {"tensors": len(lora), "targets": list(targets)}

    controlnet = tiny_controlnet(seed)
    (out / "controlnet").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(out / "controlnet" / "sd3_controlnet_tiny.safetensors"))
    manifest["files"]["controlnet/sd3_controlnet_tiny.safetensors"] = {"layout": "diffusers SD3ControlNetModel"}

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_core.fixtures", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    manifest = write_fixtures(args.out_dir, args.seed)
    for name in manifest["files"]:
        print(f"wrote {Path(args.out_dir) / name}")


if __name__ == "__main__":
    main()
