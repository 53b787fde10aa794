"""Benchmarks for DA-VAE (run by hand: see bench/README.md); not installed, not tests."""
