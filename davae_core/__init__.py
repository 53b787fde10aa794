"""Pure-PyTorch DA-VAE: structured latent, tokenizer, DiT heads, loss schedule and files.

Never imports ComfyUI; the node pack and both trainers build on it.
"""

from .checkpoint import CheckpointError, load_davae, load_heads, read_metadata, save_davae, save_heads
from .davae_model import DAVAE, SD3_VAE_CONFIG, DAVAEConfig, tiny_vae_config
from .heads import DAHeads, DetailOutputLayer, DetailPatchEmbed, HeadsConfig, attach_to_sd3_transformer
from .loss_schedule import detail_weight, scheduled_flow_loss
from .structured_latent import (
    SD3_SCALE,
    SD3_SHIFT,
    LatentLayout,
    LatentNormalizer,
    alignment_loss,
    grouped_mean_proj,
    merge,
    split,
)

__all__ = [
    "CheckpointError", "load_davae", "load_heads", "read_metadata", "save_davae", "save_heads",
    "DAVAE", "SD3_VAE_CONFIG", "DAVAEConfig", "tiny_vae_config",
    "DAHeads", "DetailOutputLayer", "DetailPatchEmbed", "HeadsConfig", "attach_to_sd3_transformer",
    "detail_weight", "scheduled_flow_loss",
    "SD3_SCALE", "SD3_SHIFT", "LatentLayout", "LatentNormalizer", "alignment_loss", "grouped_mean_proj", "merge", "split",
]
