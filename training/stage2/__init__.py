"""Stage 2: SD3.5 warm-started on structured latents (model, objective, text conditioning, cache, export)."""
