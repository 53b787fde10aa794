"""The shipped recipe configs against their stated sources (docs/METHOD.md, "Paper vs authors vs shipped").

* a config that says "everything else as X" differs from X only in the settings it lists;
* the authors' configs hold the authors' numbers (their files are named beside each value);
* the paper's LoRA targets are every linear layer of every block, the authors' their own list;
* every number of a recipe config carries a comment naming its source;
* the global batch each config is written for, and what a one-GPU launch needs to reach it;
* the realism phase continues a stage-2 run, and the resume check accepts exactly that.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from davae_core.mmdit_keys import SD3_LORA_TARGETS, SD3_LORA_TARGETS_ALL_BLOCKS
from davae_training.checkpoints import ResumeConfigError, check_resume_config
from davae_training.config import TrainLoopConfig, config_to_dict, flatten_config, load_config, log_global_batch, reach_recipe_batch
from davae_training.stage1.config import TokenizerTrainConfig
from davae_training.stage2.config import AdapterTrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
STAGE2 = ["sd35m_1024", "sd35m_1024_authors", "sd35m_1024_24gb", "sd35m_1024_80gb", "sd35m_2048", "sd35l_1024",
          "sd35m_1024_realism"]
STAGE1 = ["tokenizer_sd3_paper", "tokenizer_sd3_authors"]
# what the launch comment of every stage-2 config sets
LAUNCH = ["model.pretrained=/models/stable-diffusion-3.5-medium", "tokenizer.path=runs/davae_sd3_paper/davae.safetensors"]


def _stage2(name: str, *sets: str) -> AdapterTrainConfig:
    return load_config(AdapterTrainConfig, CONFIGS / f"{name}.yaml", list(sets))


def _flat(cfg) -> dict:
    return flatten_config(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))


def _differences(a, b) -> set[str]:
    fa, fb = _flat(a), _flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


# ---------------------------------------------------------------------------- "everything else as ..."
def test_authors_stage2_config_differs_from_the_paper_config_only_where_it_says():
    """sd35m_1024_authors.yaml: "Differences from sd35m_1024.yaml, and nothing else"."""
    allowed = {"objective.prediction", "objective.shift", "objective.detail_warmup_steps", "text.max_sequence_length",
               "sampling.shift", "model.lora_targets", "train.output_dir", "export.name"}
    paper, authors = _stage2("sd35m_1024"), _stage2("sd35m_1024_authors")
    assert _differences(paper, authors) == allowed
    assert authors.model.base_dtype == "bfloat16"  # the frozen base in bf16, as the paper config (~5 GB less)
    o = authors.objective
    assert (o.prediction, o.min_snr_gamma, o.shift, o.detail_warmup_steps) == ("x0", 5.0, 4.0, 10000)
    assert (authors.text.max_sequence_length, authors.sampling.shift) == (512, 4.0)


@pytest.mark.parametrize("name,allowed", [
    ("sd35m_1024_24gb", {"train.batch_size", "train.gradient_accumulation_steps", "train.image_every", "train.optimizer",
                         "data.cache_dir"}),
    ("sd35m_1024_80gb", {"train.gradient_accumulation_steps"}),
    ("sd35m_2048", {"train.batch_size", "train.gradient_accumulation_steps", "data.images.resolution", "sampling.resolution"}),
    ("sd35l_1024", {"train.project_name", "model.architecture"}),
    ("sd35m_1024_realism", {"train.max_steps", "train.continue_from", "data.images.sources"}),
])
def test_variants_of_the_paper_config_change_only_their_own_settings(name, allowed):
    always = {"train.output_dir", "export.name"}
    assert _differences(_stage2("sd35m_1024"), _stage2(name)) - always == allowed


# ---------------------------------------------------------------------------- the authors' numbers
def test_authors_tokenizer_config_holds_the_authors_stage1_settings():
    """sd3/davae/freeze_vae_alignment_mean.sh over sd3/davae/configs/training/SD3DAVAE/base.yaml."""
    cfg = load_config(TokenizerTrainConfig, CONFIGS / "tokenizer_sd3_authors.yaml")
    t = cfg.train
    assert (t.adam_beta1, t.adam_beta2, t.adam_weight_decay, t.weight_decay_on_1d) == (0.9, 0.99, 1e-4, False)
    assert (t.lr_schedule, t.learning_rate, t.lr_min, t.lr_warmup_steps, t.lr_decay_steps) == ("cosine", 1e-4, 1e-5, 0, 650000)
    assert (t.batch_size, t.gradient_accumulation_steps, t.recipe_global_batch, t.seed) == (8, 2, 128, 42)
    assert (t.mixed_precision, t.max_grad_norm, t.checkpoint_every) == ("bf16", 1.0, 500)
    loss = cfg.loss
    assert (loss.gan_weight, loss.align_weight, loss.l1_weight, loss.lpips_weight, loss.kl_weight) == (0.0, 0.2, 2.0, 1.0, 1e-7)
    assert not loss.uses_gan and loss.target == "stock_vae_reconstruction"
    assert not cfg.model.train_detail_trunk and cfg.data.resolution == 1024 and cfg.data.max_images == 100000


def test_paper_tokenizer_config_holds_table_s1():
    cfg = load_config(TokenizerTrainConfig, CONFIGS / "tokenizer_sd3_paper.yaml")
    t, loss = cfg.train, cfg.loss
    assert (t.learning_rate, t.adam_beta1, t.adam_beta2, t.max_steps, t.recipe_global_batch) == (1e-4, 0.9, 0.999, 10000, 16)
    assert t.lr_schedule == "constant" and t.batch_size * t.gradient_accumulation_steps * 8 == 16
    assert (loss.lpips_weight, loss.l1_weight, loss.gan_weight, loss.kl_weight, loss.align_weight) == (1.0, 2.0, 0.1, 1e-7, 1.0)


# ---------------------------------------------------------------------------- LoRA targets
def _block_linears(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks."))


@pytest.mark.parametrize("arch", ["sd35m", "sd35l"])
def test_paper_lora_targets_are_every_block_linear_and_the_authors_their_list(arch):
    from davae_training.stage2.architectures import toy_width, transformer_config
    from davae_training.preflight import random_sd3_transformer
    from davae_training.stage2.model import lora_target_names

    model = random_sd3_transformer(toy_width(transformer_config(arch), layers=3), torch.float32, torch.device("meta"))
    paper = lora_target_names(model, _stage2("sd35m_1024").model.lora_targets)
    assert paper == _block_linears(model)  # the patch embedder, output layer and embedders stay out
    assert not any(n.startswith(("pos_embed", "proj_out", "norm_out", "context_embedder", "time_text_embed")) for n in paper)
    authors = lora_target_names(model, _stage2("sd35m_1024_authors").model.lora_targets)
    context = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "norm1_context", "ff.net.0.proj")
    assert authors and not any(c in n for n in authors for c in context)
    assert set(authors) < set(paper)
    assert (arch == "sd35m") == any(".attn2." in n for n in authors)  # dual attention: attn2 by suffix
    # the context stream's last block has no output projection or MLP; its continuous adaLN is still adapted
    last = f"transformer_blocks.2."
    assert f"{last}norm1_context.linear" in paper and f"{last}attn.to_add_out" not in paper


def test_every_paper_recipe_config_uses_the_paper_targets():
    for name in STAGE2:
        targets = set(_stage2(name).model.lora_targets)
        assert targets == set(SD3_LORA_TARGETS if name.endswith("authors") else SD3_LORA_TARGETS_ALL_BLOCKS), name


# ---------------------------------------------------------------------------- every number has its source
NUMBER_LINE = re.compile(r"^(\s*)([A-Za-z_0-9]+):\s*(-?[0-9][0-9_.eE+-]*)\s*(#.*)?$")
KEY_LINE = re.compile(r"^(\s*)([A-Za-z_0-9]+):")


def _numbers_and_comments(path: Path) -> dict[str, bool]:
    """Dotted key -> whether its line has a comment, for every line whose value is a number."""
    stack: list[tuple[int, str]] = []
    out: dict[str, bool] = {}
    for line in path.read_text().splitlines():
        key = KEY_LINE.match(line)
        if not key:
            continue
        indent = len(key.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key.group(2)])
        number = NUMBER_LINE.match(line)
        if number:
            out[dotted] = number.group(4) is not None
        stack.append((indent, key.group(2)))
    return out


@pytest.mark.parametrize("name", STAGE2 + STAGE1)
def test_every_number_of_a_recipe_config_names_its_source(name):
    """The base recipes comment every number; a variant comments the numbers it changes from sd35m_1024.yaml."""
    lines = _numbers_and_comments(CONFIGS / f"{name}.yaml")
    assert lines, name
    if name in ("sd35m_1024", "sd35m_1024_authors") or name in STAGE1:
        check = set(lines)
    else:
        base = _flat(_stage2("sd35m_1024"))
        check = {k for k, v in _flat(_stage2(name)).items() if k in lines and base.get(k) != v}
    bare = sorted(k for k in check if not lines[k])
    assert not bare, f"{name}.yaml: numbers without a source comment: {bare}"


# ---------------------------------------------------------------------------- global batch
@pytest.mark.parametrize("name,processes", [
    ("sd35m_1024", 8), ("sd35m_1024_authors", 8), ("sd35m_2048", 8), ("sd35l_1024", 8), ("sd35m_1024_realism", 8),
    ("sd35m_1024_24gb", 1), ("sd35m_1024_80gb", 1),
])
def test_stage2_configs_reach_their_recipe_batch_on_the_processes_they_are_written_for(name, processes):
    loop = _stage2(name).train
    assert loop.recipe_global_batch == 128
    assert loop.batch_size * loop.gradient_accumulation_steps * processes == 128
    assert reach_recipe_batch(loop, processes, 128) == "--set train.gradient_accumulation_steps=" + str(loop.gradient_accumulation_steps)


def test_a_one_gpu_launch_is_told_how_to_reach_the_recipe_batch(caplog):
    loop = _stage2("sd35m_1024").train
    with caplog.at_level(logging.INFO, logger="davae_training"):
        assert log_global_batch(loop, 1) == 16
        assert log_global_batch(loop, 8) == 128
    first, second = caplog.records
    assert first.levelno == logging.WARNING and "--set train.gradient_accumulation_steps=8" in first.getMessage()
    assert second.levelno == logging.INFO and "the recipe's batch" in second.getMessage()
    odd = TrainLoopConfig(batch_size=6, recipe_global_batch=128)
    assert reach_recipe_batch(odd, 8, 128) == "--set train.batch_size=4 --set train.gradient_accumulation_steps=4"
    assert "process count that divides 128" in reach_recipe_batch(odd, 3, 128)


# ---------------------------------------------------------------------------- the realism phase
def test_the_realism_phase_resumes_a_sd35m_1024_checkpoint_and_nothing_else_changes():
    stage2 = _stage2("sd35m_1024", *LAUNCH, "data.images.sources=[data/sd35m_synth]")
    realism = _stage2("sd35m_1024_realism", *LAUNCH)
    assert realism.train.continue_from == stage2.train.output_dir
    assert realism.train.max_steps - stage2.train.max_steps == 5000  # paper Sec. S7: 5K steps
    saved, now = [yaml.safe_load(yaml.safe_dump(config_to_dict(c))) for c in (stage2, realism)]
    changes = check_resume_config(saved, now, False, "ckpt", new_phase=True)
    assert {"data.images.sources", "train.continue_from", "train.max_steps"} <= set(changes)
    with pytest.raises(ResumeConfigError, match=re.escape("data.images.sources")):
        check_resume_config(saved, now, False, "ckpt")  # a plain --resume may not change the data
    other = yaml.safe_load(yaml.safe_dump(config_to_dict(_stage2("sd35m_1024_realism", *LAUNCH, "model.lora_rank=64"))))
    with pytest.raises(ResumeConfigError, match=re.escape("model.lora_rank")):
        check_resume_config(saved, other, False, "ckpt", new_phase=True)  # a new phase changes the data only


def test_a_cosine_schedule_refuses_a_new_max_steps_unless_its_horizon_is_fixed():
    saved = {"train": {"max_steps": 100, "lr_schedule": "cosine", "lr_decay_steps": None}}
    with pytest.raises(ResumeConfigError, match="lr_decay_steps=100"):
        check_resume_config(saved, {"train": {**saved["train"], "max_steps": 200}}, False, "ckpt")
    fixed = {"train": {"max_steps": 100, "lr_schedule": "cosine", "lr_decay_steps": 100}}
    assert check_resume_config(fixed, {"train": {**fixed["train"], "max_steps": 200}}, False, "ckpt") == {"train.max_steps": (100, 200)}
    constant = {"train": {"max_steps": 100, "lr_schedule": "constant", "lr_decay_steps": None}}
    assert check_resume_config(constant, {"train": {**constant["train"], "max_steps": 200}}, False, "ckpt")


def test_a_checkpoint_from_before_the_new_loop_keys_resumes_with_their_defaults():
    now = yaml.safe_load(yaml.safe_dump(config_to_dict(_stage2("sd35m_1024", *LAUNCH))))
    older = {**now, "train": {k: v for k, v in now["train"].items()
                              if k not in ("lr_schedule", "lr_min", "lr_decay_steps", "weight_decay_on_1d", "continue_from")}}
    assert check_resume_config(older, now, False, "ckpt") == {}
    with pytest.raises(ResumeConfigError, match="train.lr_schedule: 'constant' -> 'cosine'"):
        check_resume_config(older, {**now, "train": {**now["train"], "lr_schedule": "cosine", "lr_decay_steps": 20000}}, False, "ckpt")
