"""Entry point for ImageNet stage 2 (LightningDiT on DA-VAE latents); the trainer lives in :mod:`davae_training.imagenet.train`."""

from .imagenet.train import main

if __name__ == "__main__":
    main()
