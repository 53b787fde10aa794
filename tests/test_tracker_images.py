"""Validation images reach TensorBoard (and wandb when importable) through accelerate's trackers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def test_tensorboard_tracker_receives_an_image_event(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from davae_training.images import log_image_file

    png = tmp_path / "grid.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(png)
    try:
        acc = Accelerator(log_with="tensorboard", project_dir=str(tmp_path / "logs"))
        acc.init_trackers("run")
        assert log_image_file(acc, "samples", png, step=7) == ["tensorboard"]
        acc.end_training()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    events = EventAccumulator(str(tmp_path / "logs" / "run"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    image = events.Images("samples")[0]
    assert image.step == 7 and (image.width, image.height) == (40, 24)


def test_no_tracker_means_nothing_sent(tmp_path):
    from davae_training.images import log_image_file

    png = tmp_path / "g.png"
    Image.new("RGB", (8, 8)).save(png)

    class NoTrackers:
        trackers: list = []

    assert log_image_file(NoTrackers(), "x", png, 0) == []


def test_wandb_tracker_gets_an_image_when_wandb_is_installed(tmp_path):
    wandb = pytest.importorskip("wandb")
    from davae_training.images import log_image_file

    png = tmp_path / "g.png"
    Image.new("RGB", (8, 8)).save(png)
    logged = []

    class FakeWandbTracker:  # accelerate's WandBTracker.log signature, without a wandb account
        name = "wandb"

        def log(self, values, step=None):
            logged.append((values, step))

    class Acc:
        trackers = [FakeWandbTracker()]

    assert log_image_file(Acc(), "samples", png, 3) == ["wandb"]
    assert isinstance(logged[0][0]["samples"], wandb.Image) and logged[0][1] == 3
