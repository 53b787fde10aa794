"""Configs for real sizes: preflight at toy width, single-file SD3.5 input, accelerate configs, the cost plan.

The full-size preflight (SD3.5-Medium, 2.5B parameters) is run by hand, never here (docs/TRAINING_STAGE2.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from davae_training.optimizers import bitsandbytes_available

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
ACCELERATE = REPO / "training" / "accelerate"


def _preflight(config: str, *sets: str, steps: int = 2):
    from davae_training.preflight import preflight

    lines: list[str] = []
    result = preflight(CONFIGS / config, steps=steps, overrides=list(sets), toy=True, device="cpu", log=lines.append)
    return result, lines


# ---------------------------------------------------------------------------- preflight at toy width
@pytest.mark.parametrize("config", ["sd35m_1024_24gb.yaml", "sd35m_1024_80gb.yaml", "sd35l_1024.yaml", "sd35m_1024.yaml"])
def test_stage2_configs_pass_preflight_at_toy_width(config):
    sets = ["data.images.resolution=64"]
    if "24gb" in config and not bitsandbytes_available():
        # SUBSTITUTION: bitsandbytes is an optional extra not installed in this interpreter; the 8-bit
        # optimizer is exercised by test_eight_bit_adamw_steps_on_cpu where it is installed.
        sets.append("train.optimizer=adamw")
    result, lines = _preflight(config, *sets)
    assert lines[-1].startswith("peak"), lines
    assert result["peak_memory_bytes"] > 0 and len(result["step_seconds"]) == 2
    assert 0 < result["params_trained"] < result["params_total"]
    # the architecture's pattern survives the toy width: SD3.5-M has dual attention in block 0, SD3.5-L none
    from davae_training.stage2.architectures import TRANSFORMERS

    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig

    arch = "sd35l" if "sd35l" in config else "sd35m"
    assert result["model"].startswith(arch)
    cfg = load_config(AdapterTrainConfig, CONFIGS / config)
    assert result["latent_shape"] == [cfg.train.batch_size, 32, 4, 4]  # the config's real micro-batch
    assert bool(TRANSFORMERS[arch]["dual_attention_layers"]) == (arch == "sd35m")
    # without a latent cache the frozen DA-VAE encodes every step: its weights and the encode's transient are reported
    assert result["encodes_images"] == (not cfg.data.cache_dir)
    if result["encodes_images"]:
        assert result["davae_weights_bytes"] > 0 and result["encode_transient_bytes"] > 0
        assert result["encode_batch_size"] == cfg.data.encode_batch_size
        assert "DA-VAE encode per step" in lines[0]


def test_sd35l_config_names_the_large_widths():
    from davae_training.stage2.architectures import hidden_size, transformer_config
    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig

    cfg = load_config(AdapterTrainConfig, CONFIGS / "sd35l_1024.yaml")
    arch = transformer_config(cfg.model.architecture)
    assert (arch["num_layers"], hidden_size(arch), arch["num_attention_heads"]) == (38, 2432, 38)
    assert cfg.model.detail_channels == 16 and cfg.model.lora_rank == 256


def test_low_memory_configs_use_their_savers():
    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig

    small = load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024_24gb.yaml")
    big = load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024_80gb.yaml")
    for cfg in (small, big):
        assert cfg.train.gradient_checkpointing and cfg.model.base_dtype in ("bfloat16", "float8")
        assert cfg.train.batch_size * cfg.train.gradient_accumulation_steps == 128  # the paper's batch on one GPU
    assert small.train.optimizer == "adamw_8bit" and small.data.cache_dir  # no T5 on a 24 GB card


def test_float8_base_steps_at_toy_width():
    result, lines = _preflight("sd35m_1024_80gb.yaml", "data.images.resolution=64", "model.base_dtype=float8", steps=1)
    assert result["base_dtype"] == "float8" and lines[-1].startswith("peak")


def test_tokenizer_config_passes_preflight_at_toy_width():
    result, lines = _preflight("tokenizer_sd3_paper.yaml", "data.resolution=64", steps=1)
    assert result["stage"] == "stage1" and result["discriminator"]
    # the step is the costliest one of the schedule: past the GAN warm-up, the discriminator trains too
    assert result["loss_schedule_step"] == 5001 and result["discriminator_updates"] == 1
    assert lines[-1].startswith("peak")


def test_preflight_command_line_prints_peak_last(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "davae_training.preflight", "--config", str(CONFIGS / "sd35m_1024.yaml"), "--toy",
                        "--steps", "1", "--set", "data.images.resolution=64", "--out", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("peak")
    assert json.loads((tmp_path / "preflight.json").read_text())["toy"] is True


@pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes (the lowmem extra) is not installed in this interpreter")
def test_eight_bit_adamw_steps_on_cpu():
    from types import SimpleNamespace

    from davae_training.optimizers import make_optimizer

    p = torch.nn.Parameter(torch.randn(256, 256))
    loop = SimpleNamespace(optimizer="adamw_8bit", learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999,
                           adam_weight_decay=0.0, adam_epsilon=1e-8)
    opt = make_optimizer([p], loop)
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert type(opt).__name__ == "AdamW8bit"
    assert opt.state[p]["state1"].dtype == torch.uint8  # the moments really are 8-bit
    assert torch.all(p.detach() < before)


def test_unknown_optimizer_is_refused():
    from davae_training.optimizers import check_optimizer_name

    with pytest.raises(ValueError, match="train.optimizer"):
        check_optimizer_name("sgd")


# ---------------------------------------------------------------------------- single-file input
def test_single_file_checkpoint_loads_as_the_diffusers_transformer(fixtures_dir):
    from diffusers import SD3Transformer2DModel

    from davae_training.stage2.sd35_single_file import load_single_file_transformer

    single = load_single_file_transformer(fixtures_dir / "checkpoints" / "sd3_tiny.safetensors")
    folder = SD3Transformer2DModel.from_pretrained(fixtures_dir / "sd3_transformer")
    a, b = single.state_dict(), folder.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("num_layers", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "pos_embed_max_size", "qk_norm"):
        assert single.config[key] == folder.config[key], key
    assert list(single.config.dual_attention_layers) == list(folder.config.dual_attention_layers)


def test_stage2_model_builds_from_a_single_file(fixtures_dir):
    from davae_training.stage2.model import AdapterModelConfig, build_adapter_model, trained_parameters

    cfg = lambda path: AdapterModelConfig(pretrained=str(path), lora_rank=4, lora_alpha=4)  # noqa: E731
    a = build_adapter_model(cfg(fixtures_dir / "checkpoints" / "sd3_tiny.safetensors")).eval()
    b = build_adapter_model(cfg(fixtures_dir / "sd3_transformer")).eval()
    assert list(trained_parameters(a)) == list(trained_parameters(b))
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 32, 8, 8, generator=g), timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 5, 64, generator=g), pooled_projections=torch.randn(1, 32, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(a(**kw).sample, b(**kw).sample)


def test_a_file_without_mmdit_tensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    from davae_training.stage2.sd35_single_file import load_single_file_transformer

    path = tmp_path / "vae_only.safetensors"
    save_file({"first_stage_model.x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="model.diffusion_model"):
        load_single_file_transformer(path)


# ---------------------------------------------------------------------------- accelerate configs
@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_config_files_parse(name, kind):
    """The shipped launch configs (tests/test_engines.py runs each of them, on CPUs)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    assert isinstance(cfg, ClusterConfig)
    assert str(cfg.distributed_type) in (kind, f"DistributedType.{kind}") and str(cfg.mixed_precision) in ("bf16", "PrecisionType.BF16")
    assert cfg.num_processes == 8
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2
        # the run config decides accumulation and clipping: a value here would override it
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config and "gradient_clipping" not in cfg.deepspeed_config
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2  # the trainers name the blocks FSDP2 shards


# ---------------------------------------------------------------------------- cost plan
def test_flop_counter_counts_on_meta_tensors():
    from bench.plan import count

    with torch.device("meta"):
        layer = torch.nn.Linear(100, 200)
        x = torch.randn(3, 100)
    flops, saved = count(lambda: layer(x).sum().backward())
    assert flops == 2 * (2 * 3 * 100 * 200)  # forward and the weight gradient (x needs no gradient)
    assert saved >= 3 * 100 * 4  # the input, kept for the weight gradient


def test_plan_counts_the_davae_and_its_encode_when_a_config_has_no_latent_cache(monkeypatch):
    """sd35m_1024 encodes 16 images at 1024 px per micro-batch: the DA-VAE's weights and the transient of one
    encode pass (data.encode_batch_size images, in the autocast dtype) are in the memory estimate."""
    import bench.plan as plan
    from davae_training.config import load_config
    from davae_training.stage2.config import AdapterTrainConfig

    cfg = load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024.yaml")
    assert not cfg.data.cache_dir and cfg.train.batch_size == 16
    bf16 = plan.davae_encode_memory(cfg, torch.bfloat16)
    assert 0.4 * 2**30 < bf16["davae_weights"] < 0.5 * 2**30  # ~110M float32 values
    fp32 = plan.davae_encode_memory(cfg, torch.float32)
    cfg.data.encode_batch_size = 16  # the whole micro-batch at once, in fp32: what the trainer used to do
    whole = plan.davae_encode_memory(cfg, torch.float32)
    assert whole["encode_transient"] > 30 * 2**30  # tens of GB
    assert 3.5 < whole["encode_transient"] / fp32["encode_transient"] < 4.5  # 4x the images per pass
    assert bf16["encode_transient"] < 0.8 * fp32["encode_transient"]  # in the autocast dtype

    monkeypatch.setattr(plan, "count", lambda fn: (1, 2**30))  # the transformer's pass is not what this test is about
    monkeypatch.setattr(plan, "davae_encode_flops", lambda resolution: 1)
    entry = plan.stage2_plan("sd35m_1024", load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024.yaml"))
    memory = entry["memory_bytes"]
    assert memory["davae_weights"] == bf16["davae_weights"] and memory["encode_transient"] == bf16["encode_transient"]
    static = sum(v for k, v in memory.items() if k not in ("activations_per_sample", "activations_micro_batch", "encode_transient",
                                                          "total_estimate"))
    assert memory["total_estimate"] == static + max(memory["activations_micro_batch"], memory["encode_transient"])
    cached = plan.stage2_plan("cached", load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024.yaml", ["data.cache_dir=c"]))
    assert "davae_weights" not in cached["memory_bytes"] and "encode_transient" not in cached["memory_bytes"]


def test_sampling_plan_ratios_at_full_size():
    from bench.plan import sampling_plan

    s = sampling_plan()
    assert s["stock_1024"]["image_tokens"] == 4096 and s["da_1024"]["image_tokens"] == 1024
    ratio = s["stock_1024"]["forward_flops"] / s["da_1024"]["forward_flops"]
    assert 3.9 < ratio < 6  # 4x the tokens, and attention grows faster
    assert s["stock_2048"]["forward_flops"] / s["da_2048"]["forward_flops"] > ratio
    assert s["da_1024"]["forward_flops"] == pytest.approx(s["stock_512"]["forward_flops"], rel=0.01)


def test_a_low_precision_base_without_autocast_is_refused():
    with pytest.raises(ValueError, match="mixed_precision=bf16"):
        _preflight("sd35m_1024_80gb.yaml", "train.mixed_precision=no", steps=1)


def test_plan_states_the_global_batch_per_process_count_and_the_one_gpu_accumulation():
    from bench.plan import batch_plan
    from davae_training.config import load_config
    from davae_training.stage1.config import TokenizerTrainConfig
    from davae_training.stage2.config import AdapterTrainConfig

    paper = batch_plan(load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024.yaml").train)
    assert paper["global_batch_by_processes"] == {1: 16, 2: 32, 4: 64, 8: 128}
    assert paper["written_for_processes"] == 8 and paper["one_gpu_reaches_recipe_with"] == "--set train.gradient_accumulation_steps=8"
    authors = batch_plan(load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024_authors.yaml").train)
    assert authors["written_for_processes"] == 8  # its GPU-days were once projected on one process (batch 16)
    one_card = batch_plan(load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024_24gb.yaml").train)
    assert one_card["written_for_processes"] == 1 and one_card["global_batch_by_processes"][1] == 128
    tokenizer = batch_plan(load_config(TokenizerTrainConfig, CONFIGS / "tokenizer_sd3_authors.yaml").train)
    assert tokenizer["global_batch_by_processes"][8] == 128 and tokenizer["one_gpu_reaches_recipe_with"].endswith("=16")


def test_plan_counts_both_lora_target_sets_and_the_realism_phase_steps():
    from bench.plan import lora_plan, phase_steps
    from davae_core.mmdit_keys import SD3_LORA_TARGETS, SD3_LORA_TARGETS_ALL_BLOCKS
    from davae_training.stage2.architectures import toy_width, transformer_config
    from davae_training.config import load_config
    from davae_training.preflight import random_sd3_transformer
    from davae_training.stage2.config import AdapterTrainConfig
    from davae_training.stage2.model import AdapterModelConfig, prepare_adapter_model

    counts = {}
    for name, targets in (("authors", SD3_LORA_TARGETS), ("paper", SD3_LORA_TARGETS_ALL_BLOCKS)):
        base = random_sd3_transformer(toy_width(transformer_config("sd35m"), layers=2), torch.float32, torch.device("meta"))
        model = prepare_adapter_model(base, AdapterModelConfig(lora_rank=4, lora_alpha=4, lora_targets=list(targets)))
        counts[name] = lora_plan(model, targets)
    # two blocks, 128 wide: block 0 has dual attention; block 1 is the last, its context stream pre-only
    assert counts["authors"]["lora_targets"] == "authors' list" and counts["paper"]["lora_targets"] == "paper: every block linear"
    assert counts["authors"]["lora_layers"] == 2 * 6 + 4  # q, k, v, out, ff.net.2, norm1 per block + attn2 q, k, v, out
    # + block 0: add_q/k/v, to_add_out, ff.net.0.proj, ff_context.net.0.proj and .2, norm1_context (8);
    #   block 1 (no context output): add_q/k/v, ff.net.0.proj, norm1_context (5)
    assert counts["paper"]["lora_layers"] == counts["authors"]["lora_layers"] + 8 + 5
    assert counts["paper"]["lora_params"] > counts["authors"]["lora_params"] > 0
    realism = load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024_realism.yaml")
    assert phase_steps(realism) == 5000 and phase_steps(load_config(AdapterTrainConfig, CONFIGS / "sd35m_1024.yaml")) == 20000
