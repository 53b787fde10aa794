"""The loop kit both trainers run on (davae_training.loop): host waits, the guard, accumulation, logging."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def count_host_reads():
    """Counts the calls that make the host wait for a tensor's value (item, bool, float, tolist)."""
    calls = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "tolist")}

    def counting(original):
        def wrapper(self, *a, **k):
            calls["n"] += 1
            return original(self, *a, **k)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class _OneProcess:
    """Stands in for an accelerator where only ``reduce`` and ``device`` are read."""

    device = torch.device("cpu")
    scaler = None
    num_processes = 1

    def reduce(self, t, reduction="sum"):
        return t


def test_the_guard_reads_the_device_once_per_step_whatever_the_number_of_tensors():
    from davae_training.run_safety import NonFiniteGuard

    guard = NonFiniteGuard(_OneProcess(), "stop", lambda: None)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(200)]
    for p in params:
        p.grad = torch.randn(3)
    with count_host_reads() as calls:
        for _ in range(4):  # micro-batches
            guard.note_loss(torch.tensor(1.0))
        assert guard.skip_step(params, 1) is False
    assert calls["n"] == 1, f"{calls['n']} host reads for one optimizer step over {len(params)} tensors"


# ---------------------------------------------------------------------------- the engine on a toy model
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.frozen(x))


def _toy_step(batch, step, generator):
    x = torch.randn(4, 3, generator=generator, device=generator.device)
    loss = model_of(batch)(x).pow(2).mean()
    return loss, {"loss": loss, "constant": 2.0}


def model_of(batch):
    return batch["model"]


def _engine(tmp_path, **train):
    from davae_training.config import TrainLoopConfig
    from davae_training.loop import Engine, TrainedModel

    engine = Engine(TrainLoopConfig(output_dir=str(tmp_path), report_to="none", **train))
    torch.manual_seed(0)
    model = TrainedModel(_Toy(), ema_decay=0.9)
    engine.prepare(model)
    return engine, model


def _run(engine, model, steps, reads=None):
    reads = reads if reads is not None else {"micro-batches": 0, "updates": 0}
    for _ in range(steps):
        for micro in engine.micro_batches():
            with count_host_reads() as calls, engine.accumulate():
                loss, logs = _toy_step({"model": model.network}, engine.step, engine.generator(micro))
                engine.backward(loss, logs)
            reads["micro-batches"] += calls["n"]
        with count_host_reads() as calls:
            engine.update()
        reads["updates"] += calls["n"]
    return reads


def test_micro_batches_never_wait_for_the_device_and_a_step_waits_the_same_whatever_the_accumulation(tmp_path):
    reads = {}
    for accumulation in (1, 4):
        engine, model = _engine(tmp_path, gradient_accumulation_steps=accumulation)
        try:
            reads[accumulation] = _run(engine, model, 3)
        finally:
            engine.close()
    assert reads[1]["micro-batches"] == reads[4]["micro-batches"] == 0, reads
    # the guard's one read per step (and AdamW's CPU step counters, which are no device wait)
    assert reads[1]["updates"] == reads[4]["updates"], reads


def test_the_engine_steps_after_prepare_on_the_prepared_parameters_with_an_ema(tmp_path):
    engine, model = _engine(tmp_path, gradient_accumulation_steps=2, learning_rate=0.1)
    try:
        head = model.module.head.weight
        assert list(engine.params.values()) == [head, model.module.head.bias]  # trained ones only, as prepared
        assert engine.optimizer.param_groups[0]["params"][0] is head
        before = head.detach().clone()
        _run(engine, model, 2)
        assert not torch.equal(head, before) and engine.state.step == 2 and engine.state.micro_batches == 4
        shadow = model.ema.shadow_params[0]
        assert not torch.equal(shadow, head) and not torch.equal(shadow, before)  # the EMA followed, behind
        with model.ema_weights():
            assert torch.equal(head, shadow)
        assert not torch.equal(head, shadow)  # the raw weights are back
    finally:
        engine.close()


def test_logged_values_are_the_means_over_every_micro_batch_since_the_last_log(tmp_path):
    engine, model = _engine(tmp_path, gradient_accumulation_steps=2)
    try:
        losses = []
        for _ in range(2):
            for micro in engine.micro_batches():
                with engine.accumulate():
                    loss, logs = _toy_step({"model": model.network}, engine.step, engine.generator(micro))
                    losses.append(float(loss))
                    engine.backward(loss, logs)
            engine.update()
        values = engine.logged_means()
        assert values["loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)
        assert values["constant"] == 2.0 and "grad_norm" in values and values["lr"] == engine.train.learning_rate
        assert engine.logged_means().keys() == {"lr"}  # the sums start again after each log
    finally:
        engine.close()


def test_each_micro_batch_draws_from_its_own_generator_seeded_by_seed_step_micro_and_rank(tmp_path):
    engine, _ = _engine(tmp_path)
    try:
        first = [torch.rand(3, generator=engine.generator(m)) for m in range(2)]
        again = torch.rand(3, generator=engine.generator(0))
        assert torch.equal(first[0], again) and not torch.equal(first[0], first[1])
        assert engine.generator(0).device == engine.device
        engine.state.step += 1
        assert not torch.equal(torch.rand(3, generator=engine.generator(0)), first[0])
    finally:
        engine.close()


# ---------------------------------------------------------------------------- the stages' steps wait for nothing
def test_prompt_dropout_needs_no_host_read():
    from davae_training.stage2.objective import drop_prompts

    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(4, 5, 8), torch.randn(4, 6)
    with count_host_reads() as calls:
        e, q, drop = drop_prompts(embeds, pooled, torch.zeros(5, 8), torch.zeros(6), 0.5, g)
    assert calls["n"] == 0
    assert torch.equal(e[~drop], embeds[~drop]) and (e[drop] == 0).all()


def test_a_stage1_micro_batch_reads_nothing_back_from_the_device(fixtures_dir):
    """Both adaptive weights on (the GAN's at the decoder's last conv, the alignment's at the detail down conv)."""
    from davae_training.config import load_config
    from davae_training.stage1.config import TokenizerTrainConfig
    from davae_training.stage1.step import TokenizerModel, TokenizerStep
    from davae_training.stage1.trainer import build_model

    cfg = load_config(TokenizerTrainConfig, REPO / "training" / "configs" / "tokenizer_tiny.yaml",
                      [f"model.pretrained_vae={fixtures_dir / 'sd3_vae'}", "loss.gan_start_step=0", "loss.gan_adaptive_weight=true",
                       "loss.align_adaptive=true"])
    davae, vae = build_model(cfg)
    model = TokenizerModel.build(cfg, davae, vae)
    step = TokenizerStep(cfg, model)
    gen = torch.Generator().manual_seed(0)
    with count_host_reads() as calls:
        loss, logs = step({"pixels": torch.rand(2, 3, 32, 32)}, 0, gen)
        loss.backward()
    assert calls["n"] == 0
    assert {"loss/total", "loss/gan_g", "loss/gan_d"} <= set(logs) and all(torch.is_tensor(v) for v in logs.values())
    assert logs["loss/align_weight"] != cfg.loss.align_weight  # measured at the detail down conv, not the constant
    assert any(p.grad is not None for p in model.discriminator.parameters())  # D's loss reached D


# ---------------------------------------------------------------------------- DeepSpeed: the run config decides
def test_deepspeed_takes_the_run_configs_batch_accumulation_and_clipping():
    from davae_training.config import TrainLoopConfig
    from davae_training.loop import configure_deepspeed

    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": True}}
    configure_deepspeed(ds, TrainLoopConfig(batch_size=4, gradient_accumulation_steps=8, max_grad_norm=0.5, mixed_precision="bf16"), 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 8, 64)
    assert ds["gradient_clipping"] == 0.5
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # fp32 weights in the model; the kit autocasts


def test_deepspeed_refuses_what_it_cannot_honour_instead_of_overriding_the_run_config():
    from davae_training.config import ConfigError, TrainLoopConfig
    from davae_training.loop import configure_deepspeed

    # what the shipped deepspeed_zero2.yaml used to say: accumulation 1 beats a one-GPU run's 8, an eighth of the batch
    ds = {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    train = TrainLoopConfig(gradient_accumulation_steps=8, max_grad_norm=1.0, on_nonfinite="skip", mixed_precision="fp16")
    with pytest.raises(ConfigError) as refused:
        configure_deepspeed(ds, train, 1)
    message = str(refused.value)
    for expected in ("gradient_accumulation_steps=1, the run config train.gradient_accumulation_steps=8", "ZeRO stage 3",
                     "train.on_nonfinite=skip", "fp16"):
        assert expected in message, message
    assert "gradient_clipping" not in message  # 1.0 == train.max_grad_norm: no conflict
    assert ds["gradient_accumulation_steps"] == 1  # nothing written when refused


@pytest.mark.parametrize("adaptive", ["loss.gan_adaptive_weight", "loss.align_adaptive"])
def test_stage1_refuses_an_adaptive_weight_under_deepspeed_only(adaptive, fixtures_dir):
    """Measured for both: under ZeRO-2 their autograd.grad breaks DeepSpeed's gradient buckets (IndexError
    mid-run); FSDP and DDP train them alike (tests/test_engines.py for the alignment weight)."""
    from davae_training.config import load_config
    from davae_training.stage1.config import TokenizerTrainConfig
    from davae_training.stage1.step import TokenizerModel
    from davae_training.stage1.trainer import build_model

    cfg = load_config(TokenizerTrainConfig, REPO / "training" / "configs" / "tokenizer_tiny.yaml",
                      [f"model.pretrained_vae={fixtures_dir / 'sd3_vae'}", f"{adaptive}=true"])
    model = TokenizerModel.build(cfg, *build_model(cfg))
    assert [p for p in model.engine_problems("deepspeed") if p.startswith(adaptive)]
    assert model.engine_problems("fsdp2") == model.engine_problems("ddp") == []
