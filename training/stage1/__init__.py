"""Stage 1: the DA-VAE tokenizer (trainer, losses, detail statistics, evaluation)."""
