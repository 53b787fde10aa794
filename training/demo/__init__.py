"""The whole recipe at toy scale on a CPU (``python -m davae_training.demo``)."""
