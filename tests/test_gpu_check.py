"""bench.gpu_check (issue 23) without ComfyUI: the training leg in --toy, the JSON it writes, the
README section rebuilt from it, and how the issue's targets are judged.

The ComfyUI legs run in ComfyUI's environment: tests/test_nodes_gpu_check.py.
"""

from __future__ import annotations

import json

import pytest

from bench.gpu_check import cli, report

README_TEXT = "# Benchmarks\n\nintro kept\n\n{heading}\n\n{begin}\nold section\n{end}\n\ntail kept\n"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_check")
    readme = folder / "README.md"
    readme.write_text(README_TEXT.format(heading=report.HEADING, begin=report.MARK_BEGIN, end=report.MARK_END))
    result = cli.main(["--toy", "--legs", "training", "--out", str(folder), "--readme", str(readme)])
    return result, folder, readme


def test_toy_training_leg_runs_the_trainers_steps_beside_the_plan(toy_run):
    result, folder, _ = toy_run
    on_disk = json.loads((folder / "gpu_check.json").read_text())
    assert on_disk["toy"] is True and on_disk["command"].startswith("python -m bench.gpu_check --toy")
    assert set(on_disk["legs"]) == {"training"}
    training = on_disk["legs"]["training"]
    assert "error" not in training, training.get("error")
    batches = [str(b) for b in result["sizes"]["train_batches"]]
    assert list(training["stage2"]) == batches
    for batch, run in list(training["stage2"].items()) + [("stage1", training["stage1"])]:
        assert run["samples_per_s"] > 0 and run["warmup_steps"] == 1
        assert len(run["step_seconds"]) >= 2
        # a CPU run says memory was not measured; it does not stand in a number for it
        assert run["peak_memory"] == {"measured": False, "why": "CPU run: GPU memory is not measured here"}
        assert run["plan"]["samples_per_s"] > 0 and run["plan"]["memory_gib"] > 0
    stage2 = training["stage2"][batches[0]]["setting"]
    assert stage2["micro_batch"] == int(batches[0]) and stage2["gradient_checkpointing"] is True
    assert stage2["base_dtype"] == "bfloat16" and stage2["ema_decay"] > 0 and stage2["encodes_images"] is False
    assert training["stage1"]["setting"]["stage"] == "stage1"


def test_toy_run_evaluates_no_gpu_target(toy_run):
    result, _, _ = toy_run
    assert result["targets"] and all(t["met"] is None and "toy" in t["why"] for t in result["targets"])


def test_readme_section_is_rebuilt_between_the_markers_only(toy_run):
    result, _, readme = toy_run
    text = readme.read_text()
    assert "intro kept" in text and "tail kept" in text and "old section" not in text
    assert text.count(report.MARK_BEGIN) == 1 and text.count(report.HEADING) == 1
    inside = text.split(report.MARK_BEGIN)[1].split(report.MARK_END)[0]
    assert "**toy sizes**" in inside and "stage 2, micro-batch" in inside and "not measured (CPU)" in inside
    report.write_readme(report.section(result), readme)  # idempotent: rebuilding gives the same file
    assert readme.read_text() == text
    assert_tables_are_whole(inside)


def assert_tables_are_whole(markdown: str) -> None:
    """Every row of every table has its header's number of cells (a '|' inside a cell would split it)."""
    columns = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            columns = None
            continue
        cells = line.count("|")
        columns = columns or cells
        assert cells == columns, line


def _measured_result(**over) -> dict:
    """A non-toy result of the JSON's shape; the values are test inputs for the judging logic."""
    mem = lambda gib: {"measured": True, "peak_gib": gib}  # noqa: E731
    legs = {
        "sampling": {"ratios": {"stock_1024_over_da_1024": 4.0, "da_1024_over_stock_512": 1.05}},
        "decode": {"runs": {"da_2048_tiled_bf16": {"peak_memory": mem(5.0)}},
                   "capped": {"da_2048": {"out_of_memory": False}, "da_1024": {"out_of_memory": True}}},
        "lowvram": {"steps": {"stock": {"out_of_memory": False}}},
        "training": {"stage2": {"8": {"samples_per_s": 12.5, "peak_memory": mem(40.0), "plan": {"memory_gib": 36.0}},
                                "16": {"samples_per_s": 11.0, "peak_memory": mem(70.0), "plan": {"memory_gib": 50.0}}},
                     "stage1": {"samples_per_s": 1.0, "peak_memory": {"measured": False}, "plan": {"memory_gib": 13.0}}},
    }
    legs.update(over)
    return {"toy": False, "sizes": {"train_batches": [8, 16]}, "legs": {k: v for k, v in legs.items() if v is not None}}


def test_targets_are_judged_against_the_issues_thresholds():
    by_name = {t["target"]: t for t in report.evaluate(_measured_result())}
    assert by_name["end to end stock-1024 / DA-1024 wall time >= 3.9"]["met"] is True
    assert by_name["end to end DA-1024 / stock-512 wall time <= 1.02"]["met"] is False
    tiled = by_name["DA 2048 tiled decode peak GB (1e9 bytes, bf16) <= 6.0"]
    assert tiled["met"] is True and tiled["measured"] == pytest.approx(5.0 * 2**30 / 1e9, abs=1e-3)  # GiB -> GB
    assert by_name["out-of-memory errors in the decodes under the 8 GB cap <= 0"] == {
        "target": "out-of-memory errors in the decodes under the 8 GB cap <= 0", "measured": 1, "met": False}
    assert by_name["out-of-memory errors in the low-VRAM sequence <= 0"]["met"] is True
    assert by_name["stage-2 samples/s at 1024, micro-batch 8 >= 12.0"]["met"] is True
    assert by_name["stage-2 samples/s at 1024, micro-batch 16 >= 12.0"]["met"] is False
    within = by_name["stage 2 micro-batch 8: relative error of the planned memory <= 0.15"]
    assert within["met"] is True and within["measured"] == pytest.approx(4 / 36, abs=1e-4)
    assert by_name["stage 2 micro-batch 16: relative error of the planned memory <= 0.15"]["met"] is False
    stage1 = by_name["stage 1: relative error of the planned memory <= 0.15"]
    assert stage1["met"] is None and stage1["why"] == "not measured in this run"


def test_a_leg_that_failed_or_did_not_run_leaves_its_targets_unevaluated():
    result = _measured_result(sampling={"error": "OutOfMemoryError: boom"}, decode=None)
    by_name = {t["target"]: t for t in report.evaluate(result)}
    assert by_name["end to end stock-1024 / DA-1024 wall time >= 3.9"] == {
        "target": "end to end stock-1024 / DA-1024 wall time >= 3.9", "measured": None, "met": None, "why": "leg sampling failed"}
    assert by_name["DA 2048 tiled decode peak GB (1e9 bytes, bf16) <= 6.0"]["why"] == "leg decode did not run"
    assert by_name["stage-2 samples/s at 1024, micro-batch 8 >= 12.0"]["met"] is True


def test_a_failing_leg_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    def broken(sizes, device, seed):
        raise RuntimeError("leg exploded\nsecond line")

    monkeypatch.setattr("bench.gpu_check.leg_training.run", broken)
    result = cli.main(["--toy", "--legs", "training", "--out", str(tmp_path), "--no-readme"])
    assert result["legs"]["training"]["error"] == "RuntimeError: leg exploded"
    assert "**training**: failed: `RuntimeError: leg exploded`" in report.section(result)


def test_toy_runs_stay_out_of_the_repositorys_results_unless_asked():
    toy = cli.parse(["--toy"])
    assert toy.out == cli.TOY_OUT and toy.no_readme is True
    full = cli.parse([])
    assert full.out == cli.common.RESULTS_DIR and full.readme == report.README and full.no_readme is False
    asked = cli.parse(["--toy", "--readme", "R.md"])
    assert asked.no_readme is False and str(asked.readme) == "R.md"


def test_merge_keeps_the_legs_this_run_did_not_rerun(monkeypatch, tmp_path):
    earlier = {"toy": True, "machine": {"date_utc": "2026-01-01 00:00 UTC"},
               "legs": {"sampling": {"error": "RuntimeError: earlier", "leg_seconds": 1.0},
                        "training": {"error": "RuntimeError: replaced", "leg_seconds": 1.0}}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(earlier))
    monkeypatch.setattr("bench.gpu_check.leg_training.run", lambda sizes, device, seed: {"error": "RuntimeError: this run"})
    result = cli.main(["--toy", "--legs", "training", "--merge", "--out", str(tmp_path), "--no-readme"])
    assert list(result["legs"]) == ["sampling", "training"]
    assert result["legs"]["sampling"]["from_run"] == "2026-01-01 00:00 UTC"
    assert result["legs"]["training"]["error"] == "RuntimeError: this run" and "from_run" not in result["legs"]["training"]
    assert "(this leg from the run of 2026-01-01 00:00 UTC, kept by --merge)" in report.section(result)
    # without --merge the file holds this run's legs only
    result = cli.main(["--toy", "--legs", "training", "--out", str(tmp_path), "--no-readme"])
    assert list(json.loads((tmp_path / "gpu_check.json").read_text())["legs"]) == ["training"]


def test_the_section_is_rebuilt_from_a_json_file(toy_run, tmp_path):
    result, folder, _ = toy_run
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n")
    report.main([str(folder / "gpu_check.json"), "--readme", str(readme)])
    assert readme.read_text() == f"# Benchmarks\n\n{report.HEADING}\n\n{report.MARK_BEGIN}\n{report.section(result)}\n{report.MARK_END}\n"


def test_without_git_the_commit_comes_from_the_prepared_carry(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(cli.common, "_git", lambda *args: "unknown")
    monkeypatch.setattr(cli, "PREPARED_AT", tmp_path / "prepared_at_commit")
    assert cli.machine(torch.device("cpu"))["commit"] == "unknown"
    (tmp_path / "prepared_at_commit").write_text("0123abcd dirty\n")
    info = cli.machine(torch.device("cpu"))
    assert info["commit"] == "0123abcd" and info["worktree_dirty"] is True and "gpu_check_prepare.sh" in info["commit_source"]


def test_the_small_card_answers_comfyuis_free_memory_question_for_the_gpu_only():
    from bench.gpu_check.memory import smaller_card

    import torch

    gib = 2**30
    asked = []

    def whole_gpu(dev=None, torch_free_too=False):
        asked.append((dev, torch_free_too))
        return (130 * gib, 2 * gib) if torch_free_too else 130 * gib

    free = smaller_card(whole_gpu, 135 * gib)  # a 143 GiB card made an 8 GiB one
    assert free() == 0 and free(torch.device("cuda")) == 0
    free = smaller_card(whole_gpu, 125 * gib)
    assert free(torch.device("cuda")) == 5 * gib
    assert free(torch.device("cuda"), torch_free_too=True) == (5 * gib, 2 * gib)
    assert free(torch.device("cpu")) == 130 * gib  # system memory is not the card's
    assert asked[-1] == (torch.device("cpu"), False)


def test_the_repositorys_readme_has_the_section_once_for_the_gpu_run_to_rebuild():
    text = report.README.read_text()
    assert text.count(report.MARK_BEGIN) == 1 and text.count(report.MARK_END) == 1
    assert text.index(report.HEADING) < text.index(report.MARK_BEGIN) < text.index(report.MARK_END)


def test_a_full_run_without_a_gpu_stops_saying_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a GPU"):
        cli.main(["--legs", "training", "--no-readme"])


def test_peak_memory_is_shown_with_what_was_held_before():
    assert report._mem({"measured": True, "peak_gib": 9.5, "rise_gib": 4.5, "baseline_gib": 5.0}) == \
        "9.5 GiB (+4.5 over the 5.0 held before)"
    assert report._mem({"out_of_memory": True, "error": "x"}) == "**out of memory**"
    assert report._mem({"measured": False, "why": "CPU run"}) == "not measured (CPU)"


def test_log_watch_keeps_the_lines_it_is_asked_about_at_any_level():
    import logging

    from bench.gpu_check.comfy_host import LogWatch
    from bench.gpu_check.leg_decode import TILED_FALLBACK

    level = logging.root.level
    with LogWatch(TILED_FALLBACK, "unet missing") as watch:
        logging.warning("Warning: Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding.")
        logging.debug("unet missing: ['x']")
        logging.warning("something else")
    logging.warning("unet missing: after the block")
    assert watch.lines == ["Warning: Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding.",
                           "unet missing: ['x']"]
    assert logging.root.level == level
