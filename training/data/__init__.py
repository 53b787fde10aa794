"""Training data both stages read: image folders / WebDataset shards, and synthetic images."""
