"""Trainers that produce DA-VAE weights (installed as ``davae_training``)."""
