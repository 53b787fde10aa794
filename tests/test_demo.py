"""The demo end to end in its --quick mode: every phase runs, resumes, and reports."""

import json

from PIL import Image

from davae_training.demo.pipeline import main


def test_quick_demo_runs_every_phase_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["--quick", "--train-base", "--out", str(out)])
    report = json.loads((out / "report_full" / "report.json").read_text())
    assert report["variant"] == "full"
    assert report["base_models"]["source"] == "trained in this run" and report["base_models"]["vae_steps"] == 6
    assert report["tokens"] == {"da": "8x8", "baseline": "8x8"}  # 64 px base, 8x8 latent, 1x1 patches
    assert json.loads((out / "toy_sd3" / "transformer" / "config.json").read_text())["patch_size"] == 1
    assert set(report["reconstruction_128px"]) == {"davae", "stock_full", "stock_half_upsampled"}
    assert set(report["generation_swd_vs_real_128px"]) == {"da", "baseline"}
    assert set(report["attribute_accuracy"]) == {"real", "da", "baseline"}
    assert all(0.0 <= v <= 1.0 for v in report["attribute_accuracy"].values())
    assert set(report["attribute_accuracy_by_attribute"]["da"]) == {"shape", "colour", "background", "mean", "all"}
    assert set(report["detail_energy_ratio"]) == {"da", "baseline"} and all(v > 0 for v in report["detail_energy_ratio"].values())
    assert set(report["texture_accuracy"]) == {"real", "reconstruction", "baseline", "da"}
    assert all(0.0 <= v <= 1.0 for v in report["texture_accuracy"].values())
    background = report["background_detail_energy_ratio"]
    assert set(background) == {"real_8bit", "stock_vae_full", "stock_vae_half_upsampled", "reconstruction", "da", "baseline"}
    assert all(v > 0 for v in background.values()) and report["background_detail_energy_real"] > 0
    assert background["real_8bit"] > 1  # rounding a smooth gradient to 8 bits adds one-pixel steps
    for metrics in report["reconstruction_128px"].values():
        assert metrics["psnr"] > 0 and -1 <= metrics["ssim"] <= 1
    assert report["comfyui"].get("skipped") or report["comfyui"].get("image")
    with Image.open(out / "report_full" / "side_by_side.png") as im:
        assert im.width > 3 * 128  # three columns of 128 px images shown at 2x
    assert (out / "report_full" / "loss_curves.png").stat().st_size > 0
    assert (out / "stage2_full" / "export" / "da_demo_full_lora.safetensors").is_file()

    # a second run finds every phase's result and skips the training
    main(["--quick", "--train-base", "--out", str(out), "--no-schedule"])
    again = json.loads((out / "report_no-schedule" / "report.json").read_text())
    assert "stage 1: DA-VAE" in again["seconds"] and again["seconds"]["pretrained toy VAE + DiT (64 px)"] < report["seconds"]["pretrained toy VAE + DiT (64 px)"]
    assert (out / "stage2_no-schedule" / "final" / "summary.json").is_file()


def test_default_demo_uses_the_shipped_base_models_and_trains_only_the_da_parts(tmp_path):
    out = tmp_path / "demo"
    main(["--quick", "--out", str(out)])
    report = json.loads((out / "report_full" / "report.json").read_text())
    assert report["base_models"]["source"] == "shipped" and report["base_models"]["dit_steps"] >= 1000
    assert not (out / "toy_sd3").exists()  # nothing trained for the base
    assert report["seconds"]["pretrained toy VAE + DiT (64 px)"] < 5  # read from the package, not trained
    assert (out / "stage1" / "davae.safetensors").is_file() and (out / "stage2_full" / "final" / "summary.json").is_file()
