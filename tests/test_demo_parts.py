"""The demo's built-in data and its weight-free generation distance."""

import torch
import torch.nn.functional as F

from davae_training.demo.procedural_images import make_batch, make_sample, write_folder
from davae_training.demo.swd import laplacian_pyramid, multiscale_swd


def test_procedural_images_are_deterministic_and_captioned():
    a, b = make_sample(7, 64, seed=3), make_sample(7, 64, seed=3)
    assert torch.equal(a.image, b.image) and a.caption == b.caption
    assert a.image.shape == (3, 64, 64) and a.image.dtype == torch.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    assert not torch.equal(make_sample(8, 64, seed=3).image, a.image)
    assert " with " in a.caption and a.caption.endswith("background")


def test_procedural_images_carry_detail_that_a_2x_downsample_loses():
    images, _ = make_batch(0, 8, 128)
    low = F.interpolate(images, scale_factor=0.5, mode="bicubic", align_corners=False)
    back = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    err = (back - images).abs().mean().item()
    smooth = F.avg_pool2d(images, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)  # same scenes without fine detail
    low_s = F.interpolate(smooth, scale_factor=0.5, mode="bicubic", align_corners=False)
    err_smooth = (F.interpolate(low_s, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1) - smooth).abs().mean().item()
    assert err > 2 * err_smooth, (err, err_smooth)  # one-pixel textures and the one-pixel outline do not survive


def test_write_folder_pairs_images_with_captions(tmp_path):
    out = write_folder(tmp_path / "data", 3, size=32)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00000.txt", "00001.png", "00001.txt", "00002.png", "00002.txt"]
    assert (out / "00001.txt").read_text() == make_sample(1, 32).caption


def test_laplacian_pyramid_reconstructs_its_input():
    x = torch.rand(2, 3, 32, 32)
    pyr = laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyr] == [32, 16, 8]
    rec = pyr[-1]
    for band in reversed(pyr[:-1]):
        rec = F.interpolate(rec, size=band.shape[-2:], mode="bilinear", align_corners=False) + band
    assert torch.allclose(rec, x, atol=1e-5)


def test_swd_ranks_blur_and_noise_behind_real_samples():
    real, _ = make_batch(0, 16, 64)
    other, _ = make_batch(100, 16, 64)
    blurred = F.interpolate(F.interpolate(other, scale_factor=0.5, mode="bicubic"), scale_factor=2, mode="bicubic").clamp(0, 1)
    same = multiscale_swd(real, other)
    blur = multiscale_swd(real, blurred)
    noise = multiscale_swd(real, torch.rand_like(real))
    assert same["level0"] < blur["level0"]  # lost detail shows at the finest level
    assert same["mean"] < noise["mean"] and blur["mean"] < noise["mean"]


def test_captions_parse_back_into_attributes_and_odd_captions_are_refused():
    import pytest

    from davae_training.demo.procedural_images import BACKGROUNDS, COLOURS, caption_attributes

    for i in range(20):
        attrs = caption_attributes(make_sample(i, 32).caption)
        assert attrs["colour"] in COLOURS and attrs["background"] in BACKGROUNDS
    assert not set(COLOURS) & set(BACKGROUNDS)  # a bag of words must tell shape colour from background
    with pytest.raises(ValueError, match="not a procedural caption"):
        caption_attributes("a red fox")


def test_toy_classifier_reads_held_out_real_images_and_not_noise():
    from davae_training.demo.toy_classifier import attribute_scores, half_resolution, texture_accuracy, train_classifier

    torch.set_num_threads(2)
    images, captions = make_batch(0, 192, 128)
    judge = train_classifier(images, captions, steps=120, progress=False).model
    held_out, held_captions = make_batch(1_000_000, 48, 128)  # judged at the demo's 128 px
    real = attribute_scores(judge, held_out, held_captions)
    assert real["mean"] >= 0.9 and set(real) == {"shape", "colour", "background", "mean", "all"}, real
    noise = attribute_scores(judge, torch.rand_like(held_out), held_captions)
    assert noise["mean"] < 0.6 and noise["all"] < real["all"], noise
    shuffled = attribute_scores(judge, held_out.roll(1, 0), held_captions)  # right images, wrong captions
    assert shuffled["mean"] < real["mean"] - 0.2, shuffled

    # the texture: read at 128 px, and only there
    texture = texture_accuracy(judge, held_out, held_captions)
    assert texture >= 0.9, texture
    assert texture_accuracy(judge, held_out.roll(1, 0), held_captions) < texture - 0.3
    # what a perfect 64 px path keeps of it (coarse aliases) does not count as the texture
    assert texture_accuracy(judge, half_resolution(held_out), held_captions) < 0.2
    assert attribute_scores(judge, half_resolution(held_out), held_captions)["mean"] >= 0.9  # the layout survives


def test_toy_classifier_trains_only_on_full_resolution_images():
    import pytest

    from davae_training.demo.toy_classifier import train_classifier

    images, captions = make_batch(0, 4, 64)
    with pytest.raises(ValueError, match="128 px"):
        train_classifier(images, captions, steps=1, progress=False)


def test_background_frame_is_background_in_every_image_and_catches_a_leak():
    from davae_training.demo.detail_energy import detail_energy, detail_energy_ratio
    from davae_training.demo.procedural_images import BACKGROUNDS, background_frame, caption_attributes

    frame = background_frame(128)
    assert 0.15 < frame.float().mean() < 0.5 and not frame[32:96, 32:96].any()
    images, captions = make_batch(0, 64, 128)
    for image, caption in zip(images, captions):  # the gradient of the caption's background colour, nothing else
        colour = torch.tensor(BACKGROUNDS[caption_attributes(caption)["background"]])
        ramp = 0.75 + 0.25 * torch.arange(128.0) / 128
        expected = colour[:, None, None] * ramp[None, :, None].expand(3, 128, 128)
        assert torch.allclose(image[:, frame], expected[:, frame], atol=1e-5), caption
    other, _ = make_batch(100, 64, 128)
    assert detail_energy(images, frame) < 1e-3 * detail_energy(images)  # smooth backgrounds
    # a texture leaking into the background: a faint checker outside the shapes
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    leak = ((yy // 2 + xx // 2) % 2).float() * 0.03
    assert detail_energy_ratio((other + leak).clamp(0, 1), images, frame) > 100
    assert detail_energy_ratio(other, images, frame) < 2  # other real images: the same smooth backgrounds
    import pytest

    with pytest.raises(ValueError, match="non-empty"):
        detail_energy(images, torch.zeros(128, 128, dtype=torch.bool))


def test_detail_energy_ratio_is_one_for_real_images_below_for_blur_above_for_noise():
    from davae_training.demo.detail_energy import detail_energy_ratio

    real, _ = make_batch(0, 16, 128)
    other, _ = make_batch(100, 16, 128)
    blurred = F.interpolate(F.interpolate(other, scale_factor=0.5, mode="bicubic"), scale_factor=2, mode="bicubic").clamp(0, 1)
    assert 0.8 < detail_energy_ratio(other, real) < 1.25
    assert detail_energy_ratio(blurred, real) < 0.75  # a 2x down-up keeps only what 64 px holds
    assert detail_energy_ratio((other + 0.1 * torch.randn_like(other)).clamp(0, 1), real) > 1.2
    import pytest

    with pytest.raises(ValueError, match="one size"):
        detail_energy_ratio(real[..., :64, :64], real)


def test_ablation_table_reports_mean_and_spread_over_seeds():
    from davae_training.demo.pipeline import ablation_table

    def report(variant, acc):
        return {"variant": variant, "attribute_accuracy": {"da": acc, "baseline": 0.7},
                "texture_accuracy": {"da": 0.5, "reconstruction": 0.9}, "background_detail_energy_ratio": {"da": 3.0},
                "detail_energy_ratio": {"da": 0.9, "baseline": 0.3},
                "generation_swd_vs_real_128px": {"da": {"level0": 0.1, "mean": 0.2}},
                "reconstruction_128px": {"davae": {"psnr": 25.0}}}

    table = ablation_table([report("full", 0.8), report("no-align", 0.6), report("full", 0.9), report("no-align", 0.7)])
    lines = table.splitlines()
    assert lines[2].startswith("| full | 2 | 0.8500 ± 0.0707") and lines[3].startswith("| no-align | 2 | 0.6500 ± 0.0707")
    assert "standard deviation over seeds" in table
    assert "±" not in ablation_table([report("full", 0.8)])


def test_toy_vae_trains_on_latent_grid_crops_and_standardises_its_latent(monkeypatch):
    from diffusers import AutoencoderKL

    from davae_training.demo import toy_base_models

    seen = []

    class Recording(AutoencoderKL):
        def encode(self, x, *a, **k):
            seen.append(tuple(x.shape[-2:]))
            return super().encode(x, *a, **k)

    monkeypatch.setattr(toy_base_models, "AutoencoderKL", Recording)
    images = torch.rand(6, 3, 64, 64)
    result = toy_base_models.train_base_vae(images, steps=3, batch_size=4, crop=32, progress=False)
    assert seen[:3] == [(32, 32)] * 3  # training steps see crops; the statistics pass after them sees whole images
    assert seen[3:] and all(s == (64, 64) for s in seen[3:])
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    cfg = result.model.config
    assert cfg.scaling_factor > 0 and torch.isfinite(torch.tensor([cfg.shift_factor, cfg.scaling_factor])).all()


def test_shipped_toy_base_models_match_the_demo_architectures_and_load():
    """The committed toy_sd3 folder must be what the current code would train: same VAE and DiT
    configs, loadable by diffusers, with its provenance and loss curves beside it."""
    import json

    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from davae_training.demo.pipeline import SHIPPED_BASE, text_conditioner
    from davae_training.demo.toy_base_models import base_dit_config, toy_vae_config

    def assert_config(loaded, expected: dict, skip=()):
        for key, value in expected.items():
            if key not in skip:
                assert loaded[key] == (list(value) if isinstance(value, tuple) else value), key

    vae = AutoencoderKL.from_pretrained(SHIPPED_BASE / "vae")
    # shift and scale are written by train_base_vae from the latents it makes
    assert_config(vae.config, toy_vae_config(), skip=("shift_factor", "scaling_factor"))
    assert vae.config.scaling_factor > 0  # standardised latent written by train_base_vae
    text = text_conditioner()
    dit = SD3Transformer2DModel.from_pretrained(SHIPPED_BASE / "transformer")
    assert_config(dit.config, base_dit_config(text.joint_attention_dim, text.pooled_dim))
    made_with = json.loads((SHIPPED_BASE / "made_with.json").read_text())
    losses = json.loads((SHIPPED_BASE / "losses.json").read_text())
    assert len(losses["base VAE"]) == made_with["vae_steps"] and len(losses["base DiT"]) == made_with["dit_steps"]
    assert sum(losses["base DiT"][-100:]) < sum(losses["base DiT"][:100])  # it trained


def test_make_toy_base_writes_a_complete_folder_the_demo_can_use(tmp_path):
    import json

    from davae_training.demo.make_toy_base import main

    main(["--out", str(tmp_path / "toy"), "--vae-steps", "2", "--dit-steps", "3", "--train-images", "8", "--batch-size", "2"])
    made_with = json.loads((tmp_path / "toy" / "made_with.json").read_text())
    assert made_with["vae_steps"] == 2 and made_with["dit_steps"] == 3 and made_with["seconds"] >= 0
    assert [len(v) for v in json.loads((tmp_path / "toy" / "losses.json").read_text()).values()] == [2, 3]
    assert (tmp_path / "toy" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "toy" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_demos_comfyui_step_runs_the_runner_from_the_checkout_or_says_it_is_missing(tmp_path, monkeypatch):
    """The ComfyUI step loads the test scaffolding's runner by path (it is not installed): the path
    must exist in the checkout, and without it the step says so instead of failing in a child."""
    from davae_training.demo import comfyui_run

    assert comfyui_run.RUNNER.is_file() and comfyui_run.RUNNER.parent.name == "davae_testing"
    monkeypatch.setattr(comfyui_run, "RUNNER", tmp_path / "missing.py")
    result = comfyui_run.run_shipped_workflow(tmp_path / "comfyui", tmp_path / "out")
    assert "needs the repository checkout" in result["skipped"] and not (tmp_path / "out").exists()


def test_every_texture_varies_from_one_latent_cell_to_the_next():
    # a texture whose period divides the VAE's 8 px cell gives every cell inside a shape the same
    # latent, and SD3's nearest-upsampling decoder can then only paint it flat: unlearnable
    from davae_training.demo.procedural_images import TEXTURES, texture_mask

    for kind in TEXTURES:
        mask = torch.from_numpy(texture_mask(kind, 64)).float()
        cells = mask.unfold(0, 8, 8).unfold(1, 8, 8).reshape(-1, 64)
        assert len(torch.unique(cells, dim=0)) > 1, kind
        assert 0.05 < mask.mean() < 0.5, kind  # a pattern on the shape's colour, not a new colour
    stripes, grid, dots = (texture_mask(kind, 64) for kind in ("stripes", "grid", "dots"))
    assert (stripes <= grid).all() and not (stripes == grid).all() and not (dots == grid).all()


def test_long_demo_takes_the_steps_that_reach_the_texture_and_its_own_folder():
    import pytest

    from davae_training.demo.pipeline import LONG_STEPS, DemoConfig, parse_args

    cfg, _, _ = parse_args(["--long"])
    assert (cfg.stage1_steps, cfg.stage2_steps) == (LONG_STEPS["stage1_steps"], LONG_STEPS["stage2_steps"])
    assert cfg.stage1_steps > DemoConfig().stage1_steps and cfg.out == "demo_out_long"
    assert parse_args([])[0].out == "demo_out"
    with pytest.raises(SystemExit):
        parse_args(["--long", "--quick"])


def test_a_results_folder_refuses_a_run_with_other_steps(tmp_path):
    import pytest

    from davae_training.demo.pipeline import DemoConfig, claim_folder

    claim_folder(tmp_path, DemoConfig())
    claim_folder(tmp_path, DemoConfig(align=False))  # an ablation of the same run shares the folder
    with pytest.raises(SystemExit, match="another --out"):
        claim_folder(tmp_path, DemoConfig(stage1_steps=2700))
