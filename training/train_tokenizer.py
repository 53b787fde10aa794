"""Entry point kept at its documented path; the trainer lives in :mod:`davae_training.stage1.trainer`."""

from .stage1.trainer import main

if __name__ == "__main__":
    main()
