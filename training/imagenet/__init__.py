"""The paper's ImageNet line: DA-VAE on VA-VAE and LightningDiT.

Model (``lightningdit``, ``lightningdit_checkpoint``, ``da_heads``), objective and sampler (``flow``,
``sampler``), the stage-2 trainer (``train``: ``config``, ``data``, ``latent_codec``, ``latent_cache``,
``step``, ``export``), evaluation (``metrics``, ``generate``) and the tiny fixtures in
the public layouts (``fixtures``).  Guide: docs/TRAINING_IMAGENET.md.
"""
