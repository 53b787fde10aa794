"""One stage-1 micro-batch: the DA-VAE's reconstruction losses and, past the GAN warm-up, the discriminator's.

:class:`TokenizerModel` is the model object the loop kit (:mod:`davae_training.loop`) trains: the
DA-VAE (the engine wraps or shards it), the frozen stock VAE (targets, grids), the loss, and the
patch discriminator as an auxiliary network kept whole on every rank.  :class:`TokenizerStep` is
called by the trainer, ``python -m davae_training.preflight`` and ``python -m bench.train_throughput``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..loop import Auxiliary, TrainedModel
from .config import TokenizerTrainConfig
from .losses import PatchDiscriminator, TokenizerLoss, build_perceptual_loss


@torch.no_grad()
def stock_reconstruction(vae, image_pm: torch.Tensor) -> torch.Tensor:
    """The stock VAE's reconstruction in [-1, 1] (the authors' training target)."""
    latent = vae.encode(image_pm.to(next(vae.parameters()).dtype)).latent_dist.mode()
    return vae.decode(latent).sample.clamp(-1.0, 1.0).to(image_pm.dtype)


def make_target(config: TokenizerTrainConfig, vae, image01: torch.Tensor) -> torch.Tensor:
    image_pm = image01 * 2.0 - 1.0
    if config.loss.target == "stock_vae_reconstruction":
        return stock_reconstruction(vae, image_pm)
    return image_pm


class TokenizerModel(TrainedModel):
    """The DA-VAE being trained, with the stock VAE, the loss and (with a GAN term) the discriminator."""

    # FSDP2 shards each resolution block of the trunks; the rest (the decoder's last conv and the detail
    # down conv, whose gradients the adaptive GAN and alignment weights read after the forward pass) stays with the root
    shard_classes = ("DownEncoderBlock2D", "UpDecoderBlock2D", "UNetMidBlock2D")
    weights_file = "model.safetensors"
    checkpoint_frozen = True  # the whole DA-VAE: --export-from reads a checkpoint like a finished run

    def __init__(self, davae: nn.Module, vae: nn.Module, loss: TokenizerLoss, discriminator: nn.Module | None = None,
                 disc_learning_rate: float = 1e-4):
        aux = {"discriminator": Auxiliary(discriminator, disc_learning_rate, "model_1.safetensors")} if discriminator is not None else {}
        super().__init__(davae, aux=aux)
        self.vae = vae
        self.loss = loss

    @classmethod
    def build(cls, config: TokenizerTrainConfig, davae: nn.Module, vae: nn.Module,
              perceptual_net: nn.Module | None = None) -> "TokenizerModel":
        loss = config.loss
        perceptual = build_perceptual_loss(loss, perceptual_net) if loss.lpips_weight > 0 else None
        disc = PatchDiscriminator(3, loss.disc_channels, loss.disc_layers, loss.disc_norm) if loss.uses_gan else None
        return cls(davae, vae, TokenizerLoss(loss, perceptual), disc, loss.disc_learning_rate or config.train.learning_rate)

    def engine_problems(self, engine: str) -> list[str]:
        if engine != "deepspeed":
            return []
        # their torch.autograd.grad outside backward breaks ZeRO-2's gradient buckets (measured: IndexError in
        # reduce_ipg_grads mid-run); DDP and FSDP train both alike
        cfg, problems = self.loss.config, []
        if self.discriminator is not None and cfg.gan_adaptive_weight:
            problems.append("loss.gan_adaptive_weight=true: the adaptive GAN weight differentiates through the decoder's "
                            "last layer outside backward, which DeepSpeed ZeRO's gradient hooks do not support; use DDP or "
                            "FSDP, or loss.gan_adaptive_weight=false")
        if cfg.align_adaptive and cfg.align_weight > 0:
            problems.append("loss.align_adaptive=true: the adaptive alignment weight differentiates through the decoder "
                            "to the detail down conv outside backward, which DeepSpeed ZeRO's gradient hooks do not support; "
                            "use DDP or FSDP, or loss.align_adaptive=false")
        return problems

    def to(self, device: torch.device) -> "TokenizerModel":
        """The frozen and auxiliary parts to ``device`` (the engine places the DA-VAE)."""
        self.vae.to(device)
        self.loss.to(device)
        return self

    @property
    def discriminator(self) -> nn.Module | None:
        aux = self.aux.get("discriminator")
        return aux.module if aux is not None else None


class TokenizerStep:
    """``step(batch, step_index, generator) -> (loss, logs)``; no host waits (logs stay on the device).

    The loss is the generator's total plus, while the GAN is active, the discriminator's hinge
    loss: two separate graphs (the discriminator sees detached images there, and is frozen while
    the generator's adversarial term goes through it), so one backward pass fills both.
    """

    def __init__(self, config: TokenizerTrainConfig, model: TokenizerModel, loss_step_offset: int = 0):
        self.config, self.model = config, model
        self.loss_step_offset = loss_step_offset  # preflight: run the losses of a later phase (past the GAN warm-up)
        self.pixels: torch.Tensor | None = None  # the last micro-batch (reconstruction grids)

    def __call__(self, batch: dict[str, Any], step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        model, loss_fn = self.model, self.model.loss
        phase = step + self.loss_step_offset
        pixels = batch["pixels"].to(generator.device, non_blocking=True)
        self.pixels = pixels
        target = make_target(self.config, model.vae, pixels)
        outputs = model.network(pixels, sample_posterior=True, generator=generator,  # posterior noise drawn on the device
                                detail_dropout=self.config.model.detail_dropout,
                                detail_dropout_rescale=self.config.model.detail_dropout_rescale)
        disc = model.discriminator
        if disc is not None:
            disc.requires_grad_(False)  # G's adversarial term: gradients reach the generator only
        # read after the forward pass: under FSDP2 these are the whole weights the pass used (the root's)
        net = model.module
        total, logs = loss_fn.generator_loss(outputs, target, phase, disc, net.decoder_trunk.conv_out.weight,
                                             net.detail_down.conv.weight)  # where loss.align_adaptive measures
        loss = total
        if disc is not None and loss_fn.gan_active(phase):
            disc.requires_grad_(True)
            d_loss = loss_fn.discriminator_loss(disc, target, outputs["reconstruction"])
            loss = total + d_loss
            logs["gan_d"] = d_loss.detach()
        return loss, {f"loss/{k}": v for k, v in logs.items()}

    @torch.no_grad()
    def reconstruction_rows(self, count: int = 4) -> list[torch.Tensor] | None:
        """input | stock VAE | DA-VAE for the first images of the last micro-batch (every rank calls it)."""
        if self.pixels is None:
            return None
        img = self.pixels[:count]
        net = self.model.module
        was_training = net.training
        net.eval()
        try:
            ours = ((net(img, sample_posterior=False)["reconstruction"].float() + 1) / 2).clamp(0, 1)
        finally:
            net.train(was_training)
        stock = ((stock_reconstruction(self.model.vae, img * 2 - 1).float() + 1) / 2).clamp(0, 1)
        return [img.float(), stock, ours]
