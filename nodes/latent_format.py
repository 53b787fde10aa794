"""The 32-channel latent format a DA-patched SD3 model samples in."""

from __future__ import annotations

import comfy.latent_formats

from .latent_ops import LAYOUT, da_process_in, da_process_out


class DASD3LatentFormat(comfy.latent_formats.SD3):
    """SD3's normalisation on the base channels, identity on the (already normalised) detail.

    ``latent_rgb_factors`` stay SD3's 16 rows: the preview wrapper of the model patch hands
    previewers the base channels only.  No TAESD name: ComfyUI would build a 32-channel
    TAESD for it, which no taesd3 file fits.
    """

    latent_channels = LAYOUT.channels

    def __init__(self):
        super().__init__()
        self.taesd_decoder_name = None

    def process_in(self, latent):
        return da_process_in(latent)

    def process_out(self, latent):
        return da_process_out(latent)
