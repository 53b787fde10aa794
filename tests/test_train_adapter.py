"""Stage-2 trainer on the tiny fixtures (CPU): warm start, learning, resume, data, export (two ranks: test_engines.py).

No SD3.5 weights exist on the machines these tests run on, so the "SD3.5 folder" is a tiny
diffusers StableDiffusion3Pipeline folder: the fixtures' transformer (under transformer/) and
VAE, with random-weight CLIP-L/CLIP-G/T5 whose tokenizers are built offline
(davae_testing.tiny_sd3_pipeline.write_tiny_sd3_pipeline).  The real code paths (diffusers'
encode_prompt, StableDiffusion3Pipeline for the synthetic data) run on it.  The shipped tiny
config uses the hashing text stand-in instead; the kill-and-resume runs use that config as is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from davae_core.fixtures import TINY_TRANSFORMER_CONFIG
from davae_training.stage2.model import (
    AdapterModelConfig,
    build_adapter_model,
    load_base_transformer,
    lora_wrapped_names,
    resolve_transformer_dir,
    trained_parameters,
)
from davae_training.stage2.objective import FlowObjectiveConfig, flow_matching_loss
from run_safety_helpers import DAMAGES, copy_run, damage, reset_accelerate, resolve_latest_logging, write_lock

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "adapter_tiny.yaml"
PROMPTS = ["a red fox in the snow", "a bowl of ramen", "a city at night", "a mountain lake at dawn"]


@pytest.fixture(scope="module")
def sd35_folder(fixtures_dir, tmp_path_factory):
    """A tiny diffusers SD3.5 folder: model_index.json, transformer/ (the fixture), vae/, text encoders."""
    from davae_testing.tiny_sd3_pipeline import write_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("sd35_tiny") / "sd35"
    return write_tiny_sd3_pipeline(root, fixtures_dir / "sd3_transformer", fixtures_dir / "sd3_vae")


@pytest.fixture(scope="module")
def images(sd35_folder, tmp_path_factory):
    """The synthetic-data command's output: the base pipeline's images for PROMPTS, captions kept."""
    from davae_training.data.synthetic import PipelineGenerator, build_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generator = PipelineGenerator(sd35_folder, resolution=96, steps=2, guidance=2.0, device="cpu", dtype=torch.float32)
    assert build_synthetic_dataset(PROMPTS, out, generator, per_prompt=2, seed=0, batch_size=4, settings=generator.settings) == 8
    return out


def _overrides(out_dir, sd35_folder, fixtures_dir, images, *extra):
    sets = [
        f"train.output_dir={out_dir}", f"model.pretrained={sd35_folder}",
        f"tokenizer.path={fixtures_dir / 'davae' / 'davae_tiny.safetensors'}", f"data.images.sources=[{images}]",
        "data.images.resolution=64", "train.report_to=none", "model.lora_rank=4", "model.lora_alpha=4",
        "train.log_every=1", "train.image_every=0", *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def _run(args, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "DAVAE_FAULT_AFTER_STEP"}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", "davae_training.train_adapter", "--config", str(TINY_CONFIG), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _final(out_dir):
    return (load_file(str(Path(out_dir) / "final" / "adapter_trained.safetensors")),
            load_file(str(Path(out_dir) / "final" / "adapter_trained_ema.safetensors")))


# ---------------------------------------------------------------------------- model
def test_transformer_folder_is_found_in_a_pipeline_folder_or_directly(sd35_folder, tmp_path):
    assert resolve_transformer_dir(sd35_folder) == sd35_folder / "transformer"
    assert resolve_transformer_dir(sd35_folder / "transformer") == sd35_folder / "transformer"
    with pytest.raises(FileNotFoundError, match="diffusers-format SD3.5 folder"):
        resolve_transformer_dir(tmp_path)


def test_zero_init_patched_model_equals_stock_at_step_zero(sd35_folder):
    stock = load_base_transformer(sd35_folder).eval()
    model = build_adapter_model(AdapterModelConfig(pretrained=str(sd35_folder), lora_rank=8, lora_alpha=8)).eval()
    assert model.config.in_channels == model.config.out_channels == 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 8, 8, generator=g)
    kw = dict(timestep=torch.tensor([900.0, 250.0]),
              encoder_hidden_states=torch.randn(2, 7, TINY_TRANSFORMER_CONFIG["joint_attention_dim"], generator=g),
              pooled_projections=torch.randn(2, TINY_TRANSFORMER_CONFIG["pooled_projection_dim"], generator=g))
    with torch.no_grad():
        ours = model(hidden_states=x, **kw).sample
        theirs = stock(hidden_states=x[:, :16], **kw).sample
    # equal up to float rounding (kernels see other memory layouts); the detail input is ignored
    torch.testing.assert_close(ours[:, :16], theirs, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(ours[:, 16:]) == 0, "zero-init O' must predict exactly zero detail"


def test_only_lora_and_the_four_heads_train(sd35_folder):
    model = build_adapter_model(AdapterModelConfig(pretrained=str(sd35_folder), lora_rank=4, lora_alpha=4))
    trained = trained_parameters(model)
    heads = sorted(n for n in trained if "lora_" not in n)
    assert heads == sorted(f"{m}.{part}.{w}" for m in ("pos_embed.proj", "proj_out") for part in ("stock", "detail")
                           for w in ("weight", "bias"))
    lora_layers = {n.split(".lora_")[0] for n in trained if "lora_" in n}
    assert lora_layers == set(lora_wrapped_names(model))
    assert any(".attn2." in n for n in lora_layers)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n or ".detail." in n for n in frozen)


def test_loss_falls_on_a_fixed_batch(sd35_folder):
    torch.manual_seed(0)
    # (gradient checkpointing is on in the command-line runs below, which train the same way)
    model = build_adapter_model(AdapterModelConfig(pretrained=str(sd35_folder), lora_rank=8, lora_alpha=8))
    model.train()
    params = trained_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 32, 8, 8, generator=g)
    ctx = torch.randn(2, 5, TINY_TRANSFORMER_CONFIG["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, TINY_TRANSFORMER_CONFIG["pooled_projection_dim"], generator=g)
    cfg = FlowObjectiveConfig(detail_warmup_steps=0)

    def loss_at(step):  # the same noise and timesteps every step: a fixed batch
        fn = lambda x, t: model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        return flow_matching_loss(fn, x0, step, cfg, torch.Generator().manual_seed(123))

    first = loss_at(0)
    for step in range(12):
        out = loss_at(step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = loss_at(12)
    assert last["loss"].item() < 0.5 * first["loss"].item(), (first["loss"].item(), last["loss"].item())
    assert last["detail_mse"].item() < first["detail_mse"].item()


# ---------------------------------------------------------------------------- the command
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, sd35_folder, fixtures_dir, images):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "objective.detail_warmup_steps=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = _run(_overrides(full, sd35_folder, fixtures_dir, images, *common, "train.image_every=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(_overrides(cut, sd35_folder, fixtures_dir, images, *common), {"DAVAE_FAULT_AFTER_STEP": "3"})
    assert r.returncode == 17, f"the fault hook should have killed the run after step 3:\n{r.stderr[-3000:]}"
    assert not (cut / "final").exists()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["checkpoint-00000002"]
    r = _run(_overrides(cut, sd35_folder, fixtures_dir, images, *common) + ["--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr

    (a, a_ema), (b, b_ema) = _final(full), _final(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
        assert torch.equal(a_ema[name], b_ema[name]), f"EMA of {name} differs after resume"
    # the run trained something and wrote what the issue asks for
    assert any(a[n].abs().max() > 0 for n in a if "proj_out.detail" in n)
    summary = json.loads((full / "final" / "summary.json").read_text())
    assert summary["step"] == 4 and summary["ranks_in_sync"]
    assert {"loss", "loss/base_mse", "loss/detail_mse", "detail_weight"} <= set(summary["last_logged"])
    assert (full / "samples" / "step-00000004.png").is_file()
    assert (full / "export" / "da_tiny_lora.safetensors").is_file() and (full / "export" / "da_tiny_heads.safetensors").is_file()
    lora = load_file(str(full / "export" / "da_tiny_lora.safetensors"))
    assert all(k.startswith("transformer.") for k in lora)
    # the export command, from the run folder, writes the same files as the end of training (EMA weights)
    from davae_training.stage2.export import main as export

    export(["--run", str(full), "--checkpoint", "final", "--out", str(tmp_path / "cli"), "--name", "da_tiny"])
    for kind in ("lora", "heads"):
        ours = load_file(str(tmp_path / "cli" / f"da_tiny_{kind}.safetensors"))
        theirs = load_file(str(full / "export" / f"da_tiny_{kind}.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ema_b = {f"transformer.{n.split('.lora_B.')[0]}.lora_B.weight": v for n, v in a_ema.items() if ".lora_B." in n}
    assert ema_b and all(torch.equal(lora[k], v) for k, v in ema_b.items()), "the export must carry the EMA weights"


# ---------------------------------------------------------------------------- data
def test_synthetic_dataset_keeps_captions_and_resumes(images, tmp_path):
    from davae_training.data.images import ImageDataConfig, build_index, read_caption
    from davae_training.data.synthetic import main as synthesise

    records, report = build_index(ImageDataConfig(sources=[str(images)], resolution=64))
    assert report.kept == 8
    assert sorted(read_caption(r) for r in records) == sorted(PROMPTS * 2)
    meta = json.loads((images / "00000" / "000003.json").read_text())
    assert meta["prompt"] == PROMPTS[1] and meta["seed"] == 3 and meta["steps"] == 2
    # the command line; an interrupted build resumes where it stopped
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "out"
    synthesise(["--generator", "standin", "--prompts", str(prompts), "--out", str(out), "--resolution", "64", "--max-prompts", "3"])
    (out / "00000" / "000001.png").unlink()
    before = (out / "00000" / "000000.png").stat().st_mtime_ns
    synthesise(["--generator", "standin", "--prompts", str(prompts), "--out", str(out), "--resolution", "64", "--max-prompts", "3"])
    assert sorted(p.name for p in (out / "00000").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert (out / "00000" / "000000.png").stat().st_mtime_ns == before



def _write_tiny_flux_pipeline(folder: Path) -> Path:
    """A diffusers FluxPipeline folder with random tiny components and offline tokenizers (no FLUX weights here)."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from davae_testing.tiny_sd3_pipeline import byte_level_clip_tokenizer, character_t5_tokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok, t5_tok = byte_level_clip_tokenizer(Path(tmp) / "clip"), character_t5_tokenizer(Path(tmp) / "t5")
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
                                            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
                                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4, shift_factor=0.0, scaling_factor=1.0,
                            use_quant_conv=False, use_post_quant_conv=False)
        FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                     tokenizer_2=t5_tok, transformer=transformer).save_pretrained(str(folder))
    return folder


def test_realism_phase_images_come_from_a_flux_pipeline_folder(tmp_path):
    """python -m davae_training.data.synthetic --generator flux: the command sd35m_1024_realism.yaml names."""
    from PIL import Image

    from davae_training.data.synthetic import main as synthesise

    flux = _write_tiny_flux_pipeline(tmp_path / "flux")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse in a storm\na bowl of cherries\n")
    out = tmp_path / "flux_realism"
    synthesise(["--generator", "flux", "--pretrained", str(flux), "--prompts", str(prompts), "--out", str(out), "--resolution", "32",
                "--steps", "2", "--guidance", "3.5", "--dtype", "float32"])
    pngs = sorted((out / "00000").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (32, 32) for p in pngs)
    assert (out / "00000" / "000001.txt").read_text() == "a bowl of cherries"
    assert json.loads((out / "00000" / "000000.json").read_text())["pipeline"] == "FluxPipeline"

def test_training_from_the_cache_touches_neither_vae_nor_text_encoder(tmp_path, sd35_folder, fixtures_dir, images, monkeypatch):
    import davae_training.stage2.trainer as ta
    from davae_core.checkpoint import load_davae
    from davae_training.stage2.caption_cache import CachedConditioningDataset, build_cache
    from davae_training.stage2.config import CaptionDataConfig
    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig
    from davae_training.data.images import ImageDataConfig, ImageDataset, build_index
    from davae_training.stage2.text_conditioning import SD3TextConditioner, text_settings
    from davae_training.stage2.latent_grid import LatentGrid

    images_cfg = ImageDataConfig(sources=[str(images)], resolution=64, crop="center")
    records, _ = build_index(images_cfg)
    davae = load_davae(fixtures_dir / "davae" / "davae_tiny.safetensors").eval()
    text = SD3TextConditioner(sd35_folder, max_sequence_length=16)
    cache = tmp_path / "cache"
    grid = LatentGrid(davae.layout.factor, TINY_TRANSFORMER_CONFIG["patch_size"])  # whole 2x2 patches: 32-px crops
    cache_cfg = CaptionDataConfig(images=images_cfg, cache_dir=str(cache), cache_dtype="float32", cache_shard_size=3)
    build_cache(records, cache_cfg, davae.encode, text, sample_prompts=["a fox"], grid=grid)
    # an interrupted build (no index yet, a shard missing) resumes and ends with the same index
    index = (cache / "index.json").read_text()
    (cache / "index.json").unlink()
    (cache / "shard-00001-b000.safetensors").unlink()
    build_cache(records, cache_cfg, davae.encode, text, sample_prompts=["a fox"], grid=grid)
    assert (cache / "index.json").read_text() == index
    data = CachedConditioningDataset(cache)
    assert len(data) == 8
    item = data[5 + 8]  # epoch 1, sample 5
    direct = ImageDataset(records, images_cfg)[5]
    with torch.no_grad():
        torch.testing.assert_close(item["latents"], davae.encode(direct["pixels"][None])[0], atol=1e-5, rtol=1e-5)
    e, p = text.encode([direct["caption"]])
    assert item["caption"] == direct["caption"]
    torch.testing.assert_close(item["embeds"], e[0], atol=1e-5, rtol=1e-5)  # encoded in a batch of 3 there
    torch.testing.assert_close(item["pooled"], p[0], atol=1e-5, rtol=1e-5)

    def forbidden(*a, **k):
        raise AssertionError("training from a complete cache must not load the VAE or a text encoder")

    import davae_training.stage2.conditioning as conditioning

    monkeypatch.setattr(conditioning, "load_davae_for_training", forbidden)
    monkeypatch.setattr(conditioning, "build_text_conditioner", forbidden)
    # the cache serves the text settings it was made with (SD3's encoders, T5 length 16, float32) and no other
    args = _overrides(tmp_path / "run", sd35_folder, fixtures_dir, images, "train.max_steps=2", "train.checkpoint_every=0",
                      f"data.cache_dir={cache}", "tokenizer.path=''", "export.enabled=false", "text.kind=sd3",
                      "text.max_sequence_length=16", "text.dtype=float32", "data.cache_dtype=float32")
    cfg = load_config(AdapterTrainConfig, TINY_CONFIG, args[1::2])
    assert text.settings == text_settings(cfg.text, cfg.model.pretrained)
    longer = load_config(AdapterTrainConfig, TINY_CONFIG, [*args[1::2], "text.max_sequence_length=32"])
    with pytest.raises(ValueError, match=r"built with text.max_sequence_length=16, but the config asks for "
                                         r"text.max_sequence_length=32. Rebuild it .*python -m davae_training.stage2.caption_cache"):
        ta.train(longer)
    reset_accelerate()
    try:
        summary = ta.train(cfg)
    finally:  # accelerate keeps process-wide state; leave none behind for other tests
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert summary["step"] == 2 and summary["last_logged"]["loss"] > 0


def test_uncached_encode_runs_in_chunks_under_the_steps_autocast(tmp_path, sd35_folder, fixtures_dir, images, monkeypatch):
    """Without a latent cache the DA-VAE encodes data.encode_batch_size images per pass, in bf16 under
    train.mixed_precision=bf16 (one fp32 pass over a micro-batch of 16 at 1024 px holds tens of GB)."""
    import davae_training.stage2.trainer as ta
    from davae_core.davae_model import DAVAE
    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig

    calls = []
    encode = DAVAE.encode

    def spy(self, image, *a, **k):
        calls.append((image.shape[0], torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return encode(self, image, *a, **k)

    monkeypatch.setattr(DAVAE, "encode", spy)
    cfg = load_config(AdapterTrainConfig, TINY_CONFIG, _overrides(
        tmp_path / "run", sd35_folder, fixtures_dir, images, "train.max_steps=1", "train.batch_size=3", "data.encode_batch_size=2",
        "train.mixed_precision=bf16", "train.checkpoint_every=0", "export.enabled=false", "train.gradient_checkpointing=false")[1::2])
    try:
        summary = ta.train(cfg)
    finally:
        reset_accelerate()
    assert summary["step"] == 1
    assert [n for n, _, _ in calls] == [2, 1], calls  # the micro-batch of 3 in passes of 2
    assert all(on and dtype == torch.bfloat16 for _, on, dtype in calls), calls


# ---------------------------------------------------------------------------- run safety (issue 16)

STAGE2_FILES = {"weights": "adapter_trained.safetensors", "ema": "adapter_trained_ema.safetensors",
                "optimizer": "optimizer.safetensors", "state": "trainer_state.json"}
SAFETY_COMMON = ("train.max_steps=4", "train.checkpoint_every=2", "train.checkpoints_total_limit=5", "objective.detail_warmup_steps=3")


@pytest.fixture(scope="module")
def stage2_run(sd35_folder, fixtures_dir, images, tmp_path_factory):
    """One uninterrupted 4-step run with checkpoints at steps 2 and 4; the cases below work on copies."""
    out = tmp_path_factory.mktemp("stage2_safety") / "run"
    r = _run(_overrides(out, sd35_folder, fixtures_dir, images, *SAFETY_COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _cfg(out, sd35_folder, fixtures_dir, images, *more):
    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig

    return load_config(AdapterTrainConfig, TINY_CONFIG, _overrides(out, sd35_folder, fixtures_dir, images, *SAFETY_COMMON, *more)[1::2])


@pytest.mark.parametrize("kind,how", [(k, h) for k in STAGE2_FILES for h in DAMAGES])
def test_stage2_resume_latest_skips_a_damaged_checkpoint(stage2_run, tmp_path, caplog, kind, how):
    out = copy_run(stage2_run, tmp_path / "run")
    damage(out / "checkpoints" / "checkpoint-00000004" / STAGE2_FILES[kind], how)
    chosen, log = resolve_latest_logging(out, caplog)
    assert chosen is not None and chosen.name == "checkpoint-00000002"
    assert "skipping checkpoint-00000004" in log and STAGE2_FILES[kind] in log, log


def test_stage2_fallback_resume_ends_bit_identical(stage2_run, sd35_folder, fixtures_dir, images, tmp_path):
    out = copy_run(stage2_run, tmp_path / "run", drop=("final", "export"))
    damage(out / "checkpoints" / "checkpoint-00000004" / STAGE2_FILES["ema"], "overwritten")
    r = _run(_overrides(out, sd35_folder, fixtures_dir, images, *SAFETY_COMMON) + ["--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping checkpoint-00000004" in r.stderr and "at step 2" in r.stderr
    (a, a_ema), (b, b_ema) = _final(stage2_run), _final(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a_ema[k], b_ema[k]) for k in a)


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=1", "train.batch_size"), ("train.seed=3", "train.seed"),
    ("data.images.resolution=32", "data.images.resolution"), ("model.lora_rank=2", "model.lora_rank"),
    ("train.learning_rate=0.0005", "--change-learning-rate"),
])
def test_stage2_resume_refuses_config_changes_that_break_it(stage2_run, sd35_folder, fixtures_dir, images, override, key):
    import re

    from davae_training.checkpoints import plan_resume
    from davae_training.checkpoints import ResumeConfigError

    with pytest.raises(ResumeConfigError, match=re.escape(key)):
        plan_resume("latest", _cfg(stage2_run, sd35_folder, fixtures_dir, images, override))


def test_stage2_new_learning_rate_applied_nonfinite_stop_and_skip(stage2_run, sd35_folder, fixtures_dir, images, tmp_path, monkeypatch):
    """From checkpoint 4: a new learning rate (with the flag) is really used; a NaN loss stops or skips."""
    import yaml

    import davae_training.stage2.trainer as ta
    from davae_training.run_safety import NonFiniteError

    out = copy_run(stage2_run, tmp_path / "lr", drop=("final", "export"))
    try:
        summary = ta.train(_cfg(out, sd35_folder, fixtures_dir, images, "train.max_steps=5", "train.learning_rate=0.0005"),
                           "latest", change_learning_rate=True)
    finally:
        reset_accelerate()
    assert summary["step"] == 5 and summary["last_logged"]["lr"] == pytest.approx(5e-4, rel=1e-9)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["learning_rate"] == 5e-4

    import davae_training.stage2.step as stage2_step

    original = stage2_step.flow_matching_loss

    def poisoned(model_fn, latents, step, *a, **k):
        losses = original(model_fn, latents, step, *a, **k)
        return {**losses, "loss": losses["loss"] * float("nan")} if step + 1 == 5 else losses

    monkeypatch.setattr(stage2_step, "flow_matching_loss", poisoned)
    stop = copy_run(stage2_run, tmp_path / "stop", drop=("final", "export"))
    try:
        with pytest.raises(NonFiniteError, match="at step 5.*Last good checkpoint: .*checkpoint-00000004"):
            ta.train(_cfg(stop, sd35_folder, fixtures_dir, images, "train.max_steps=5"), "latest")
    finally:
        reset_accelerate()
    assert not (stop / "export").exists() and not (stop / "run.lock").exists()
    skip = copy_run(stage2_run, tmp_path / "skip", drop=("final", "export"))
    try:
        ta.train(_cfg(skip, sd35_folder, fixtures_dir, images, "train.max_steps=5", "train.on_nonfinite=skip"), "latest")
    finally:
        reset_accelerate()
    # the skipped step left the weights as checkpoint 4 had them
    before = load_file(str(stage2_run / "checkpoints" / "checkpoint-00000004" / "adapter_trained.safetensors"))
    after = load_file(str(skip / "final" / "adapter_trained.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_later_phase_continues_a_stage2_run_on_other_data(stage2_run, sd35_folder, fixtures_dir, images, tmp_path):
    """The realism phase (sd35m_1024_realism.yaml): train.continue_from starts a new run where a finished
    one ended (weights, EMA, optimizer, step) and reads its own data from the start; a plain resume
    with other data is refused, and the new run resumes its own checkpoints after that."""
    import re

    import davae_training.stage2.trainer as ta
    from davae_training.checkpoints import ResumeConfigError, plan_resume
    from davae_training.data.synthetic import main as synthesise

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse in a storm\na bowl of cherries\n")
    flux = tmp_path / "flux_images"
    synthesise(["--generator", "standin", "--prompts", str(prompts), "--out", str(flux), "--resolution", "96", "--per-prompt", "2"])
    phase = ("train.max_steps=6", f"data.images.sources=[{flux}]")

    with pytest.raises(ResumeConfigError, match=re.escape("data.images.sources")):  # the old advice: --resume + new data
        plan_resume("latest", _cfg(copy_run(stage2_run, tmp_path / "plain"), sd35_folder, fixtures_dir, images, *phase))

    # at the earlier phase's last step: nothing to train, the weights are the checkpoint's
    same = tmp_path / "same"
    try:
        ta.train(_cfg(same, sd35_folder, fixtures_dir, images, f"train.continue_from={stage2_run}", f"data.images.sources=[{flux}]"))
    finally:
        reset_accelerate()
    start = load_file(str(stage2_run / "checkpoints" / "checkpoint-00000004" / "adapter_trained.safetensors"))
    assert all(torch.equal(start[k], v) for k, v in _final(same)[0].items())

    out = tmp_path / "realism"
    try:
        summary = ta.train(_cfg(out, sd35_folder, fixtures_dir, images, f"train.continue_from={stage2_run}", *phase))
    finally:
        reset_accelerate()
    assert summary["step"] == 6
    state = json.loads((out / "checkpoints" / "checkpoint-00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["micro_batches"] == 2  # this phase's data from its start: 2 micro-batches
    assert str(flux) in (out / "data_index.json").read_text() and str(images) not in (out / "data_index.json").read_text()
    assert not all(torch.equal(start[k], v) for k, v in _final(out)[0].items())
    # interrupted later, it resumes its own checkpoints, not the earlier phase's
    plan = plan_resume("latest", _cfg(out, sd35_folder, fixtures_dir, images, f"train.continue_from={stage2_run}", *phase))
    assert plan.path.parent.parent == out and not plan.new_phase


def test_stage2_export_refuses_nonfinite_weights(sd35_folder, tmp_path):
    from davae_training.run_safety import NonFiniteError
    from davae_training.stage2.export import export_for_comfy

    model = build_adapter_model(AdapterModelConfig(pretrained=str(sd35_folder), lora_rank=4, lora_alpha=4))
    with torch.no_grad():
        next(iter(trained_parameters(model).values())).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        export_for_comfy(model, tmp_path / "export", "nan", None)
    assert not (tmp_path / "export").exists()


def test_stage2_a_second_run_into_the_same_folder_refuses(sd35_folder, fixtures_dir, images, tmp_path):
    import socket

    import davae_training.stage2.trainer as ta
    from davae_training.run_safety import RunLockError

    out = tmp_path / "run"
    write_lock(out, socket.gethostname(), os.getppid())
    with pytest.raises(RunLockError, match="running process"):
        ta.train(_cfg(out, sd35_folder, fixtures_dir, images))
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


def test_authors_objective_config_runs_a_tiny_width_training(tmp_path, sd35_folder, fixtures_dir, images):
    """sd35m_1024_authors.yaml (x0 target, min-SNR 5, shift 4, 10k ramp, T5 512) trains at fixture width."""
    import math

    import davae_training.stage2.trainer as ta
    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig

    authors = REPO / "training" / "configs" / "sd35m_1024_authors.yaml"
    paper = load_config(AdapterTrainConfig, REPO / "training" / "configs" / "sd35m_1024.yaml", [])
    args = _overrides(tmp_path / "run", sd35_folder, fixtures_dir, images, "train.max_steps=2", "train.checkpoint_every=0",
                      "train.batch_size=2", "train.mixed_precision=no", "model.base_dtype=float32", "train.dataloader_num_workers=0",
                      "train.gradient_checkpointing=false", "text.dtype=float32", "data.images.resize_short_side=false",
                      "export.enabled=false", "sampling.resolution=64", "sampling.steps=2")
    cfg = load_config(AdapterTrainConfig, authors, args[1::2])
    o = cfg.objective
    assert (o.prediction, o.min_snr_gamma, o.shift, o.detail_warmup_steps, cfg.text.max_sequence_length) == ("x0", 5.0, 4.0, 10000, 512)
    assert (paper.objective.prediction, paper.objective.shift, paper.objective.detail_warmup_steps) == ("velocity", 3.0, 5000)
    try:
        summary = ta.train(cfg)
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert summary["step"] == 2 and math.isfinite(summary["last_logged"]["loss"]) and summary["last_logged"]["loss"] > 0
