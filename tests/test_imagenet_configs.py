"""The ImageNet configs (training/configs/imagenet/): each parses, is planned by bench.plan, and the
Table 1/4/5 files differ from their reference in exactly the switches the paper names."""

from __future__ import annotations

from pathlib import Path

import pytest

from davae_training.config import config_to_dict, flatten_config, load_config

REPO = Path(__file__).resolve().parents[1]
IMAGENET = REPO / "training" / "configs" / "imagenet"
# what may differ between two runs of one table besides the switch under test: where they write
RUN_NAMES = {"train.output_dir", "export.name"}


def _load(name: str):
    from bench.plan import imagenet_stage
    from davae_training.imagenet.config import LightningDiTTrainConfig
    from davae_training.stage1.config import TokenizerTrainConfig

    path = IMAGENET / f"{name}.yaml"
    return load_config(LightningDiTTrainConfig if imagenet_stage(path) == "lightningdit" else TokenizerTrainConfig, path)


def _differences(a: str, b: str) -> dict[str, tuple]:
    fa, fb = (flatten_config(config_to_dict(_load(n))) for n in (a, b))
    return {k: (fa.get(k), fb.get(k)) for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k not in RUN_NAMES}


def test_every_imagenet_config_parses_and_is_planned():
    from bench import plan

    names = sorted(p.stem for p in IMAGENET.glob("*.yaml"))
    assert {"lightningdit_xl_da_paper", "lightningdit_xl_da_authors", "tokenizer_vavae", "lightningdit_tiny"} <= set(names)
    for name in names:
        cfg = _load(name)
        if "tiny" in name:
            continue
        entry = plan.plan_imagenet_config(IMAGENET / f"{name}.yaml")
        plan.project(entry, entry["batch"]["written_for_processes"], plan.DEFAULT_MFU)
        assert entry["global_batch"] == cfg.train.recipe_global_batch, name
        assert entry["train_flops_per_sample"] > 0 and entry["gpus"]["H100 80GB"]["gpu_days_total"] > 0, name
        assert entry["gpus"]["H100 80GB"]["fits_estimate"], f"{name}: its micro-batch does not fit an 80 GB GPU"
        if entry["stage"] == "imagenet_stage2":  # LightningDiT-XL/1 with P'/O' for D = 96
            assert 670e6 < entry["params_total"] < 680e6 and entry["image_tokens"] == 256


def test_build_plan_walks_the_imagenet_folder(monkeypatch, tmp_path):
    from bench import plan

    (tmp_path / "imagenet").mkdir()
    for name in ("tokenizer_vavae", "lightningdit_tiny"):
        (tmp_path / "imagenet" / f"{name}.yaml").write_text((IMAGENET / f"{name}.yaml").read_text())
    monkeypatch.setattr(plan, "CONFIGS_DIR", tmp_path)
    monkeypatch.setattr(plan, "IMAGENET_CONFIGS_DIR", tmp_path / "imagenet")
    monkeypatch.setattr(plan, "sampling_plan", lambda: {k: {"forward_flops": 1.0} for k in plan.SAMPLING})
    built = plan.build_plan()
    assert list(built["configs"]) == ["imagenet/tokenizer_vavae"] and "imagenet/lightningdit_tiny" in built["skipped"]
    assert built["configs"]["imagenet/tokenizer_vavae"]["base_vae"] == "vavae"


def test_table1_paper_and_authors_readings_differ_in_n_warm_and_qk_norm():
    diff = _differences("lightningdit_xl_da_paper", "lightningdit_xl_da_authors")
    assert diff == {"objective.detail_warmup_steps": (10000, 20000), "model.enable_qknorm": (False, True)}
    cfg = _load("lightningdit_xl_da_paper")
    assert (cfg.train.learning_rate, cfg.train.adam_beta1, cfg.train.adam_beta2, cfg.ema_decay) == (2e-4, 0.9, 0.95, 0.999)
    assert cfg.model.head_init == "zero" and cfg.data.resolution == 512


@pytest.mark.parametrize("name, key, value", [
    ("lightningdit_xl_t5_no_alignment", "tokenizer.path", "runs/davae_vavae_t4_align0/davae.safetensors"),
    ("lightningdit_xl_t5_random_init", "model.head_init", "random"),
    ("lightningdit_xl_t5_repeat_average", "model.head_init", "repeat_average"),
    ("lightningdit_xl_t5_no_schedule", "objective.detail_warmup_steps", 0),
])
def test_each_table5_ablation_switches_off_one_component(name, key, value):
    diff = _differences("lightningdit_xl_t5_full", name)
    assert list(diff) == [key] and diff[key][1] == value


def test_table4_sweeps_only_the_alignment_weight_over_the_papers_values():
    names = {0.0: "tokenizer_vavae_t4_align0", 0.1: "tokenizer_vavae_t4_align0p1", 0.5: "tokenizer_vavae_t4_align0p5",
             1.0: "tokenizer_vavae_t4_align1"}
    for weight, name in names.items():
        assert _load(name).loss.align_weight == weight
        diff = _differences("tokenizer_vavae_t4_align0p5", name)
        assert set(diff) <= {"loss.align_weight"}, diff
    # the reference DiT of Tables 4 and 5 trains on the lambda_align = 0.5 tokenizer of the sweep
    assert _load("lightningdit_xl_t5_full").tokenizer.path == f"{_load(names[0.5]).train.output_dir}/davae.safetensors"


def test_the_stage1_recipe_is_table_s1s():
    cfg = _load("tokenizer_vavae")
    assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps * 8 == cfg.train.recipe_global_batch == 128
    assert (cfg.train.learning_rate, cfg.train.adam_beta1, cfg.train.adam_beta2) == (1e-4, 0.5, 0.9)
    loss = cfg.loss
    assert (loss.lpips_weight, loss.l1_weight, loss.gan_weight, loss.kl_weight, loss.align_weight) == (1.0, 1.0, 0.1, 1e-6, 0.5)
    assert cfg.model.base_vae == "vavae" and cfg.model.detail_channels == 96 and cfg.model.detail_dropout == 0.1


@pytest.mark.parametrize("config, sets", [
    ("lightningdit_xl_da_authors", ["data.resolution=64", "train.batch_size=2"]),  # qk-norm on, images encoded
    ("lightningdit_xl_t5_repeat_average", ["data.resolution=64", "train.batch_size=2", "data.latent_cache=cache"]),
    ("tokenizer_vavae", ["data.resolution=64", "train.batch_size=1", "loss.gan_start_step=0"]),
])
def test_imagenet_configs_pass_preflight_at_toy_width(config, sets):
    import math

    from davae_training.preflight import preflight

    lines = []
    result = preflight(IMAGENET / f"{config}.yaml", steps=2, overrides=sets, toy=True, device="cpu", log=lines.append)
    assert len(result["step_seconds"]) == 2 and all(math.isfinite(float(ln.rsplit("loss ", 1)[1])) for ln in lines if "loss " in ln)
    if config.startswith("lightningdit"):
        assert result["stage"] == "imagenet" and result["latent_shape"] == [2, 16, 2, 2]  # C + D = 4 + 12 at toy width
        assert result["qk_norm"] == (config == "lightningdit_xl_da_authors")
        assert result["encodes_images"] == ("data.latent_cache=cache" not in sets)
    else:
        assert result["stage"] == "stage1" and result["model"].startswith("VA-VAE at toy width")
