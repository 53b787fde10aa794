"""Entry point kept at its documented path; the trainer lives in :mod:`davae_training.stage2.trainer`."""

from .stage2.trainer import main

if __name__ == "__main__":
    main()
