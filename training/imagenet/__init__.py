"""The paper's ImageNet line: DA-VAE on VA-VAE and LightningDiT (model, flow, sampler, importers, FID/IS)."""
