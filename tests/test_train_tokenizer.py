"""Stage-1 trainer end to end on CPU with the tiny fixture VAE.

LPIPS runs on the logged random-feature stand-in here: no LPIPS weights can be downloaded in CI.
"""

from __future__ import annotations

import json
import logging
import re
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from davae_core import load_davae, read_metadata
from davae_training.checkpoints import find_latest_checkpoint
from davae_training.runtime import FAULT_ENV
from davae_training.config import ConfigError, load_config
from davae_training.stage1.losses import TokenizerLoss
from davae_training.stage1.stats import ChannelMoments
from davae_training.stage1.config import TokenizerTrainConfig
from davae_training.stage1.step import make_target, stock_reconstruction
from davae_training.stage1.trainer import build_model, export_from_checkpoint, export_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
TINY = CONFIGS / "tokenizer_tiny.yaml"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Eight smooth synthetic 48x48 images (structure for the losses to learn)."""
    out = tmp_path_factory.mktemp("train_images")
    y, x = np.mgrid[0:48, 0:48].astype(np.float32)
    for i in range(8):
        img = np.stack([
            127 + 120 * np.sin(x / (3 + i)), 127 + 120 * np.cos(y / (4 + i)), 127 + 120 * np.sin((x + y) / (5 + i)),
        ], -1)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out / f"img{i}.png")
    return out


def _overrides(fixtures_dir, image_dir, output_dir, **extra) -> list[str]:
    sets = {
        "model.pretrained_vae": str(fixtures_dir / "sd3_vae"),
        "data.sources": f"[{image_dir}]",
        "data.resolution": 32,
        "train.output_dir": str(output_dir),
        "train.max_steps": 4,
        "train.batch_size": 2,
        "train.checkpoint_every": 2,
        "train.checkpoints_total_limit": 5,
        "train.log_every": 1,
        "train.image_every": 2,
        "train.dataloader_num_workers": 0,
        "loss.gan_start_step": 1,
        "stats.num_images": 4,
        **extra,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def _cli(overrides: list[str], *more: str) -> list[str]:
    out = ["--config", str(TINY)]
    for o in overrides:
        out += ["--set", o]
    return out + list(more)


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], env: dict[str, str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == expect_rc, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    if (ckpt / "model_1.safetensors").is_file():  # the discriminator
        state.update({f"disc.{k}": v for k, v in load_file(str(ckpt / "model_1.safetensors")).items()})
    return state


@pytest.fixture(scope="module")
def uninterrupted_run(fixtures_dir, image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_full")
    _run([sys.executable, "-m", "davae_training.train_tokenizer", *_cli(_overrides(fixtures_dir, image_dir, out))], _env())
    return out


# ---------------------------------------------------------------------------- in-process
def test_two_steps_lower_the_loss_on_a_fixed_batch(fixtures_dir, image_dir):
    config = load_config(TokenizerTrainConfig, TINY, _overrides(fixtures_dir, image_dir, "unused") + ["loss.gan_weight=0"])
    torch.manual_seed(0)
    model, vae = build_model(config)
    loss_fn = TokenizerLoss(config.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = torch.stack([torch.from_numpy(np.array(Image.open(image_dir / f"img{i}.png"))[:32, :32]).permute(2, 0, 1).float() / 255 for i in range(2)])
    target = make_target(config, vae, batch)

    def loss_now():
        total, _ = loss_fn.generator_loss(model(batch, sample_posterior=False), target, 0)
        return total

    first = loss_now()
    losses = [first.item()]
    for _ in range(2):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
        losses.append(loss_now().item())
    assert losses[2] < losses[1] < losses[0], losses
    # the frozen base encoder did not move
    assert all(not p.requires_grad for p in model.base_encoder.parameters())


def test_authors_recipe_freezes_detail_trunk_and_targets_stock_reconstruction(fixtures_dir, image_dir):
    config = load_config(TokenizerTrainConfig, CONFIGS / "tokenizer_sd3_authors.yaml", [
        f"model.pretrained_vae={fixtures_dir / 'sd3_vae'}", "data.resolution=32"])
    assert config.loss.align_weight == 0.2 and config.loss.gan_weight == 0 and not config.loss.uses_gan
    model, vae = build_model(config)
    assert not any(p.requires_grad for p in model.detail_trunk.parameters())
    assert all(p.requires_grad for p in model.decoder_trunk.parameters())
    assert all(p.requires_grad for p in model.detail_down.parameters())
    img = torch.rand(1, 3, 32, 32)
    target = make_target(config, vae, img)
    assert torch.allclose(target, stock_reconstruction(vae, img * 2 - 1))
    assert not torch.allclose(target, img * 2 - 1)


def test_shipped_configs_load_and_overrides_apply(fixtures_dir):
    paper = load_config(TokenizerTrainConfig, CONFIGS / "tokenizer_sd3_paper.yaml")
    assert (paper.loss.lpips_weight, paper.loss.l1_weight, paper.loss.gan_weight, paper.loss.kl_weight, paper.loss.align_weight) == (1.0, 2.0, 0.1, 1e-7, 1.0)
    assert paper.train.learning_rate == 1e-4 and paper.train.max_steps == 10000 and paper.data.resolution == 1024
    tiny = load_config(TokenizerTrainConfig, TINY, ["train.max_steps=7", "data.sources=[a, b]", "loss.kl_weight=1e-3"])
    assert tiny.train.max_steps == 7 and tiny.data.sources == ["a", "b"] and tiny.loss.kl_weight == 1e-3
    with pytest.raises(ConfigError, match="tokenizer_tiny.yaml: Key 'max_stepz' not in 'TrainLoopConfig'.*max_steps"):
        load_config(TokenizerTrainConfig, TINY, ["train.max_stepz=7"])
    with pytest.raises(ConfigError, match="'many' .* could not be converted to Integer; full_key: train.max_steps"):
        load_config(TokenizerTrainConfig, TINY, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of"):
        load_config(TokenizerTrainConfig, TINY, ["train.mixed_precision=fp8"])
    # YAML 1.1 reads a bare `no` as false: it still means "no"
    assert load_config(TokenizerTrainConfig, TINY, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    # a config is an object: built in Python, it is the same as from its YAML
    from dataclasses import replace

    from davae_training.config import TrainLoopConfig

    built = replace(tiny, train=TrainLoopConfig(**{**vars(tiny.train), "max_steps": 9}))
    assert built.train.max_steps == 9 and built.loss == tiny.loss


def test_detail_statistics_identity_when_disabled(fixtures_dir, image_dir, tmp_path):
    from davae_training.data.images import build_index

    config = load_config(TokenizerTrainConfig, TINY, _overrides(fixtures_dir, image_dir, tmp_path) + ["stats.enabled=false"])
    model, _ = build_model(config)
    records, _ = build_index(config.data)
    path = export_model(config, model, records, step=0, path=tmp_path / "identity.safetensors")
    loaded = load_davae(path)
    assert loaded.normalizer.detail_is_identity
    assert read_metadata(path)["info"]["detail_statistics"] == "identity (disabled)"


def test_channel_moments_match_torch():
    x = torch.randn(6, 3, 5, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 3
    m = ChannelMoments(3)
    m.update(x[:2])
    m.update(x[2:])
    flat = x.transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(m.mean, flat.mean(1)) and torch.allclose(m.std, flat.std(1))


# ---------------------------------------------------------------------------- real runs (subprocesses)
def test_run_outputs_and_export_loads_and_decodes(uninterrupted_run, fixtures_dir, image_dir):
    out = uninterrupted_run
    assert [p.name for p in (out / "checkpoints").iterdir()] and find_latest_checkpoint(out).name == "checkpoint-00000004"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert (out / "samples" / "step-00000002.png").is_file() and (out / "data_report.json").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    model = load_davae(out / "davae.safetensors")
    assert not model.normalizer.detail_is_identity  # statistics were measured
    info = read_metadata(out / "davae.safetensors")["info"]
    assert info["step"] == 4 and info["detail_statistics"]["images"] == 4
    img = torch.rand(1, 3, 32, 32)
    latent = model.encode(img)
    assert latent.shape == (1, 32, 2, 2)
    rec = model.decode(latent)
    assert rec.shape == img.shape and torch.isfinite(rec).all()
    # the exported decoder is the trained one, not the initialisation
    trained = _weights(find_latest_checkpoint(out))
    w = trained["model.decoder_up.conv.weight"]
    assert torch.equal(model.decoder_up.conv.weight, w)
    init, _ = build_model(load_config(TokenizerTrainConfig, TINY, _overrides(fixtures_dir, image_dir, out)))
    assert not torch.equal(init.decoder_up.conv.weight, w)


def test_export_from_checkpoint(uninterrupted_run, tmp_path):
    """The export path of ``--export-from`` (run in-process to spare a subprocess start)."""
    target = tmp_path / "from_ckpt.safetensors"
    config = load_config(TokenizerTrainConfig, uninterrupted_run / "config.yaml")  # the resolved config the run wrote
    assert main_args_export(config, target, uninterrupted_run) == target
    model = load_davae(target)
    assert read_metadata(target)["info"]["checkpoint"] == "checkpoint-00000004"
    assert model.decode(model.encode(torch.rand(1, 3, 32, 32))).shape == (1, 3, 32, 32)
    full = load_davae(uninterrupted_run / "davae.safetensors")
    assert torch.equal(full.decoder_up.conv.weight, model.decoder_up.conv.weight)


def main_args_export(config, target, run_dir):
    from davae_training.stage1.trainer import parse_args

    args = parse_args(["--config", str(run_dir / "config.yaml"), "--export-from", "latest", "--export-to", str(target)])
    assert args.export_from == "latest"
    return export_from_checkpoint(config, args.export_from, args.export_to)


def test_kill_and_resume_matches_uninterrupted_run(uninterrupted_run, fixtures_dir, image_dir, tmp_path):
    out = tmp_path / "run_killed"
    args = [sys.executable, "-m", "davae_training.train_tokenizer", *_cli(_overrides(fixtures_dir, image_dir, out))]
    killed = _run(args, _env(DAVAE_FAULT_AFTER_STEP="3"), expect_rc=17)
    assert "exiting hard after step 3" in killed.stderr
    assert find_latest_checkpoint(out).name == "checkpoint-00000002"  # step 3 was lost, as allowed
    assert (out / "run.lock").is_file()  # left by the killed run: the resume must see it as stale
    assert not (out / "davae.safetensors").exists()
    resumed = _run(args + ["--resume", "latest"], _env())
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    full = _weights(find_latest_checkpoint(uninterrupted_run))
    again = _weights(find_latest_checkpoint(out))
    assert find_latest_checkpoint(out).name == "checkpoint-00000004"
    assert full.keys() == again.keys() and any(k.startswith("disc.") for k in full)
    different = [k for k in full if not torch.equal(full[k], again[k])]
    assert not different, f"weights differ after resume: {different[:5]}"


def test_two_process_cpu_run_keeps_ranks_identical(fixtures_dir, image_dir, tmp_path):
    out = tmp_path / "run_ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "-m", "davae_training.train_tokenizer", *_cli(_overrides(fixtures_dir, image_dir, out, **{"train.image_every": 0}))]
    _run(args, _env())
    summary = json.loads((out / "final" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"], summary
    a, b = summary["rank_digests"]
    assert a == b and len(a) == 64
    # trained (not the initial weights) and exported once, by the main process
    assert load_davae(out / "davae.safetensors").decode(torch.zeros(1, 32, 2, 2)).shape == (1, 3, 32, 32)
    shutil.rmtree(out, ignore_errors=True)


def test_evaluation_report_and_grid(uninterrupted_run, fixtures_dir, image_dir, tmp_path):
    from davae_training.stage1.evaluate import main as evaluate_main, reconstruct_all
    from davae_training.stage1.config import TokenizerModelConfig
    from davae_training.stage1.trainer import load_pretrained_vae

    davae = load_davae(uninterrupted_run / "davae.safetensors")
    vae = load_pretrained_vae(TokenizerModelConfig(pretrained_vae=str(fixtures_dir / "sd3_vae")))
    img = torch.rand(2, 3, 32, 32)
    recs = reconstruct_all(davae, vae, img)
    assert set(recs) == {"davae", "stock_full", "stock_half_upsampled"}
    assert all(r.shape == img.shape and 0 <= r.min() and r.max() <= 1 for r in recs.values())
    evaluate_main(["--davae", str(uninterrupted_run / "davae.safetensors"), "--vae", str(fixtures_dir / "sd3_vae"),
                   "--images", str(image_dir), "--resolution", "32", "--out", str(tmp_path / "eval"), "--max-images", "3"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["images"] == 3 and set(report["methods"]) == {"davae", "stock_full", "stock_half_upsampled"}
    for m in report["methods"].values():
        assert np.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1
        assert m["rfid"] is None or np.isfinite(m["rfid"])
    if report["methods"]["davae"]["rfid"] is None:
        assert report["rfid_unavailable"]  # the reason is reported, not hidden
    assert report["methods"]["davae"]["latent_cells"] == report["methods"]["stock_half_upsampled"]["latent_cells"] == 4
    assert report["methods"]["stock_full"]["latent_cells"] == 16
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.size == (4 * 34 + 2, 3 * 34 + 2)  # 4 columns x 3 images of 32 px with 2 px padding


def test_only_complete_checkpoints_count(tmp_path):
    from davae_training.checkpoints import CHECKSUM_FILE, STATE_FILE, RunCheckpointError, _checksums, list_checkpoints, resolve_resume
    from davae_core.atomic_files import write_json_atomic

    root = tmp_path / "checkpoints"
    for name, complete in [("checkpoint-00000002", True), ("checkpoint-00000010", True),
                           ("checkpoint-00000012", False), (".tmp-checkpoint-00000014", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / STATE_FILE).write_text("{}")
            write_json_atomic(root / name / CHECKSUM_FILE, _checksums(root / name))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000010", "checkpoint-00000012"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-00000010"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path / "elsewhere") is None  # nothing yet: fresh start
    with pytest.raises(RunCheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(root / "checkpoint-00000012"), tmp_path)


def test_image_grid_layout(tmp_path):
    from davae_training.images import save_image_grid

    rows = [torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)]
    path = save_image_grid(rows, tmp_path / "g.png", padding=1)
    arr = np.array(Image.open(path))
    assert arr.shape == (2 * 9 + 1, 3 * 9 + 1, 3)
    assert arr[1:9, 1:9].max() == 0 and arr[10:18, 1:9].min() == 255
    with pytest.raises(ValueError, match="grid rows"):
        save_image_grid([torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8)], tmp_path / "bad.png")


# ---------------------------------------------------------------------------- run safety (issue 16)
# Cheap cases work on copies of the one uninterrupted run (checkpoints at steps 2 and 4); only the
# fallback, the learning-rate change and the non-finite cases train, for one to three steps.
from run_safety_helpers import DAMAGES, copy_run, damage, dead_pid, reset_accelerate, resolve_latest_logging, write_lock  # noqa: E402

STAGE1_FILES = {"weights": "model.safetensors", "discriminator": "model_1.safetensors", "optimizer": "optimizer.safetensors",
                "state": "trainer_state.json", "checksums": "checksums.json"}


def _config(fixtures_dir, image_dir, out, *more):
    return load_config(TokenizerTrainConfig, TINY, _overrides(fixtures_dir, image_dir, out) + list(more))


@pytest.mark.parametrize("kind,how", [(k, h) for k in STAGE1_FILES if k != "checksums" for h in DAMAGES] + [("checksums", "missing")])
def test_resume_latest_skips_a_damaged_checkpoint(uninterrupted_run, tmp_path, caplog, kind, how):
    out = copy_run(uninterrupted_run, tmp_path / "run")
    damage(out / "checkpoints" / "checkpoint-00000004" / STAGE1_FILES[kind], how)
    chosen, log = resolve_latest_logging(out, caplog)
    assert chosen is not None and chosen.name == "checkpoint-00000002"
    assert "skipping checkpoint-00000004" in log and STAGE1_FILES[kind] in log, log
    word = {"truncated": "bytes", "missing": "missing", "overwritten": "checksum"}[how]
    assert word in log, log


def test_resume_refuses_clearly_when_no_checkpoint_is_usable(uninterrupted_run, tmp_path):
    from davae_training.checkpoints import RunCheckpointError, resolve_resume

    out = copy_run(uninterrupted_run, tmp_path / "run")
    damage(out / "checkpoints" / "checkpoint-00000004" / "optimizer.safetensors", "truncated")
    damage(out / "checkpoints" / "checkpoint-00000002" / "model.safetensors", "overwritten")
    with pytest.raises(RunCheckpointError, match=r"no usable checkpoint(.|\n)*optimizer.safetensors(.|\n)*model.safetensors(.|\n)*new run"):
        resolve_resume("latest", out)
    with pytest.raises(RunCheckpointError, match="model.safetensors does not match its checksum.*--resume latest"):
        resolve_resume(str(out / "checkpoints" / "checkpoint-00000002"), out)


def test_the_authors_schedule_and_decay_groups_resume_bit_identical(fixtures_dir, image_dir, tmp_path):
    """The authors' stage-1 optimizer (tokenizer_sd3_authors.yaml: a cosine to lr_min after a warm-up, no
    weight decay on biases and norm gains) through the loop kit's checkpoints: both parameter groups and
    the schedule's position survive a kill, and the run ends where the uninterrupted one ends, at lr_min."""
    recipe = {"train.lr_schedule": "cosine", "train.lr_warmup_steps": 1, "train.learning_rate": 1e-3, "train.lr_min": 1e-4,
              "train.weight_decay_on_1d": "false", "train.adam_weight_decay": 1e-4, "train.adam_beta2": 0.99}
    runs = {}
    for name, fault in (("full", None), ("killed", "3")):
        out = tmp_path / name
        args = [sys.executable, "-m", "davae_training.train_tokenizer", *_cli(_overrides(fixtures_dir, image_dir, out, **recipe))]
        if fault:
            _run(args, _env(DAVAE_FAULT_AFTER_STEP=fault), expect_rc=17)
            args.append("--resume")
            args.append("latest")
        _run(args, _env())
        runs[name] = out
    meta = json.loads((runs["killed"] / "checkpoints" / "checkpoint-00000002" / "optimizer.json").read_text())
    assert [g["weight_decay"] for g in meta["param_groups"]] == [1e-4, 0.0]  # >= 2-d tensors, then biases and gains
    a, b = (_weights(run / "checkpoints" / "checkpoint-00000004") for run in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for run in runs.values():
        assert json.loads((run / "final" / "summary.json").read_text())["last_logged"]["lr"] == pytest.approx(1e-4)


def test_fallback_resume_ends_bit_identical(uninterrupted_run, fixtures_dir, image_dir, tmp_path):
    """The newest checkpoint's weights are damaged: resume falls back to step 2 and ends where the full run ended."""
    out = copy_run(uninterrupted_run, tmp_path / "run", drop=("final", "davae.safetensors"))
    damage(out / "checkpoints" / "checkpoint-00000004" / "model.safetensors", "overwritten")
    args = [sys.executable, "-m", "davae_training.train_tokenizer", *_cli(_overrides(fixtures_dir, image_dir, out)), "--resume", "latest"]
    resumed = _run(args, _env())
    assert "skipping checkpoint-00000004" in resumed.stderr and "at step 2" in resumed.stderr
    full = json.loads((uninterrupted_run / "final" / "summary.json").read_text())
    again = json.loads((out / "final" / "summary.json").read_text())
    assert again["step"] == 4 and again["rank_digests"] == full["rank_digests"]
    a, b = _weights(uninterrupted_run / "checkpoints" / "checkpoint-00000004"), _weights(out / "checkpoints" / "checkpoint-00000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=1", "train.batch_size"), ("train.seed=3", "train.seed"),
    ("data.resolution=48", "data.resolution"), ("model.detail_channels=8", "model.detail_channels"),
    ("train.learning_rate=0.0005", "--change-learning-rate"),
])
def test_resume_refuses_config_changes_that_break_it(uninterrupted_run, fixtures_dir, image_dir, override, key):
    from davae_training.checkpoints import plan_resume
    from davae_training.checkpoints import ResumeConfigError

    config = _config(fixtures_dir, image_dir, uninterrupted_run, override)
    with pytest.raises(ResumeConfigError, match=re.escape(key)):
        plan_resume("latest", config)
    if key == "--change-learning-rate":  # with the flag it is accepted
        assert plan_resume("latest", config, change_learning_rate=True).learning_rate == 5e-4


def test_resume_applies_safe_config_changes(uninterrupted_run, fixtures_dir, image_dir, caplog):
    from davae_training.checkpoints import plan_resume

    config = _config(fixtures_dir, image_dir, uninterrupted_run, "train.max_steps=6", "train.log_every=2",
                     "train.checkpoint_every=3", "train.on_nonfinite=skip")
    with caplog.at_level(logging.INFO, logger="davae_training"):
        plan = plan_resume("latest", config)
    # data.index_cache too: train() points it into output_dir, this bare config leaves it unset
    assert set(plan.changes) == {"train.max_steps", "train.log_every", "train.checkpoint_every", "train.on_nonfinite", "data.index_cache"}
    assert plan.changes["train.max_steps"] == (4, 6) and plan.learning_rate is None
    assert "train.max_steps changed 4 -> 6 (applied)" in caplog.text


def test_new_learning_rate_is_really_used_and_recorded(uninterrupted_run, fixtures_dir, image_dir, tmp_path):
    import yaml

    from davae_training.stage1.trainer import train

    out = copy_run(uninterrupted_run, tmp_path / "run", drop=("final", "davae.safetensors"))
    config = _config(fixtures_dir, image_dir, out, "train.max_steps=5", "train.learning_rate=0.0005", "train.image_every=0")
    try:
        train(config, resume="latest", change_learning_rate=True)
    finally:
        reset_accelerate()
    summary = json.loads((out / "final" / "summary.json").read_text())
    assert summary["step"] == 5 and summary["last_logged"]["lr"] == pytest.approx(5e-4, rel=1e-9)
    for saved in (out / "config.yaml", out / "checkpoints" / "checkpoint-00000005" / "config.yaml"):
        train_cfg = yaml.safe_load(saved.read_text())["train"]
        assert train_cfg["learning_rate"] == 5e-4 and train_cfg["max_steps"] == 5, saved
    assert not (out / "run.lock").exists()


def _nan_at_step(monkeypatch, bad_step: int) -> None:
    """The generator loss turns NaN while making step ``bad_step`` (as a diverging run would)."""
    original = TokenizerLoss.generator_loss

    def poisoned(self, outputs, target, step, *a, **k):
        total, logs = original(self, outputs, target, step, *a, **k)
        return (total * float("nan") if step + 1 == bad_step else total), logs

    monkeypatch.setattr(TokenizerLoss, "generator_loss", poisoned)


def test_nonfinite_loss_stops_the_run_with_step_and_last_good_checkpoint(uninterrupted_run, fixtures_dir, image_dir, tmp_path, monkeypatch):
    from davae_training.run_safety import NonFiniteError
    from davae_training.stage1.trainer import train

    out = copy_run(uninterrupted_run, tmp_path / "run", drop=("final", "davae.safetensors", "checkpoints/checkpoint-00000004"))
    _nan_at_step(monkeypatch, 3)
    config = _config(fixtures_dir, image_dir, out, "train.image_every=0")
    try:
        with pytest.raises(NonFiniteError, match="non-finite loss.* at step 3.*Last good checkpoint: .*checkpoint-00000002"):
            train(config, resume="latest")
    finally:
        reset_accelerate()
    assert not (out / "davae.safetensors").exists() and not (out / "final").exists()
    assert not (out / "run.lock").exists()  # released on the way out


def test_nonfinite_loss_skips_the_step_when_configured(uninterrupted_run, fixtures_dir, image_dir, tmp_path, monkeypatch, caplog):
    from davae_training.stage1.trainer import train

    out = copy_run(uninterrupted_run, tmp_path / "run", drop=("final", "davae.safetensors", "checkpoints/checkpoint-00000004"))
    _nan_at_step(monkeypatch, 3)
    config = _config(fixtures_dir, image_dir, out, "train.image_every=0", "train.on_nonfinite=skip")
    try:
        with caplog.at_level(logging.WARNING, logger="davae_training"):
            train(config, resume="latest")
    finally:
        reset_accelerate()
    assert re.search(r"non-finite loss( and gradient)? at step 3: step skipped", caplog.text), caplog.text
    exported = load_file(str(out / "davae.safetensors"))
    assert all(torch.isfinite(t).all() for t in exported.values() if t.is_floating_point())


def test_export_refuses_nonfinite_weights(fixtures_dir, image_dir, tmp_path):
    from davae_training.run_safety import NonFiniteError

    config = _config(fixtures_dir, image_dir, tmp_path)
    model, _ = build_model(config)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        export_model(config, model, [], 4, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def test_a_second_run_into_the_same_folder_refuses(fixtures_dir, image_dir, tmp_path):
    from davae_training.run_safety import RunLockError
    from davae_training.stage1.trainer import train

    out = tmp_path / "run"
    write_lock(out, socket.gethostname(), os.getppid())  # a live process on this host owns it
    with pytest.raises(RunLockError, match=f"running process \\(pid {os.getppid()}"):
        train(_config(fixtures_dir, image_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing written


def test_output_lock_stale_and_foreign(tmp_path, caplog):
    from davae_training.run_safety import OutputLock, RunLockError

    lock_file = write_lock(tmp_path, socket.gethostname(), dead_pid())
    with caplog.at_level(logging.WARNING, logger="davae_training"), OutputLock(tmp_path):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        other = subprocess.run([sys.executable, "-c", f"from davae_training.run_safety import OutputLock; OutputLock({str(tmp_path)!r}).acquire()"],
                               cwd=REPO, capture_output=True, text=True)  # another process sees us holding it
        assert other.returncode != 0 and f"running process (pid {os.getpid()}" in other.stderr, other.stderr[-2000:]
    assert "stale lock" in caplog.text and not lock_file.exists()
    write_lock(tmp_path, "another-host", os.getpid())
    with pytest.raises(RunLockError, match="host 'another-host'.*delete .*run.lock"):
        OutputLock(tmp_path).acquire()


def test_webdataset_bucket_stage1_run_trains_and_exports(fixtures_dir, tmp_path):
    """A two-step stage-1 run reading gzip WebDataset shards into aspect-ratio buckets, one corrupt sample."""
    import io
    import tarfile

    from davae_training.stage1.trainer import train

    rng = np.random.default_rng(0)
    shard = tmp_path / "shard-000.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        for i, (h, w) in enumerate([(48, 96), (96, 48), (64, 64), (48, 96), (96, 48), (64, 64), (50, 50)]):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            data = b"corrupt" if i == 6 else buf.getvalue()
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    overrides = _overrides(fixtures_dir, "unused", tmp_path / "run", **{
        "data.sources": f"['{tmp_path}/shard-{{000..000}}.tar.gz']", "data.format": "webdataset", "data.buckets": "true",
        "data.resolution": 48, "train.max_steps": 2, "train.checkpoint_every": 100, "train.image_every": 100,
        "loss.gan_weight": 0, "stats.num_images": 2, "data.shuffle_buffer": 2})
    config = load_config(TokenizerTrainConfig, TINY, overrides)
    path = train(config)
    assert path is not None and load_davae(path).normalizer is not None
    summary = json.loads((tmp_path / "run" / "final" / "summary.json").read_text())
    assert summary  # the run reached its end
