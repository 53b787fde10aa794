"""Crafted files must be refused from their header, with a clear error, before anything is allocated.

Every loader of our files (load_davae, load_heads, read_metadata with a kind, the authors'
importer) is fed files an attacker could write: architectures far beyond what the tensors
hold, out-of-range or wrongly typed fields, metadata that is not JSON, duplicate keys, one
tensor too few or too many, and pickles whose tensors or zip entries claim more than the file
holds.  Peak memory of the refusals is measured in a subprocess.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from davae_core import CheckpointError, load_davae, load_heads, read_metadata, save_davae, save_heads
from davae_core.authors_import import import_heads, import_tokenizer
from davae_core.checkpoint import load_pickled_state_dict, load_tensors
from davae_core.file_validation import read_safetensors_header
from davae_core.fixtures import random_heads, tiny_transformer

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ crafting
def write_raw_safetensors(path: Path, entries: list[tuple[str, str, list[int], bytes]], metadata_json: str | None) -> Path:
    """A safetensors file written byte by byte, so headers can be what no library would write.

    ``entries`` are (name, dtype, shape, data); names may repeat.  ``metadata_json`` is put
    verbatim as the ``__metadata__`` value (a JSON object text) when given.
    """
    parts, blob = [], b""
    for name, dtype, shape, data in entries:
        parts.append(f'{json.dumps(name)}:{{"dtype":"{dtype}","shape":{json.dumps(shape)},"data_offsets":[{len(blob)},{len(blob) + len(data)}]}}')
        blob += data
    if metadata_json is not None:
        parts.insert(0, f'"__metadata__":{metadata_json}')
    header = ("{" + ",".join(parts) + "}").encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + blob)
    return path


def ours_metadata(kind: str, config_text: str, info_text: str = "{}") -> str:
    return json.dumps({"davae_format": "1", "davae_kind": kind, "davae_config": config_text, "davae_info": info_text})


def with_config(src: Path, dst: Path, kind: str, config: dict | str, state=None) -> Path:
    """``src``'s tensors (or ``state``) under a replaced config."""
    text = config if isinstance(config, str) else json.dumps(config)
    meta = {"davae_format": "1", "davae_kind": kind, "davae_config": text, "davae_info": "{}"}
    save_file(state if state is not None else load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "heads.safetensors"
    return save_heads(random_heads(tiny_transformer(0), seed=1), path)


@pytest.fixture(scope="module")
def davae_file(tmp_path_factory, davae):
    return save_davae(davae, tmp_path_factory.mktemp("davae") / "davae.safetensors")


def heads_config(path: Path) -> dict:
    return read_metadata(path, "da_heads")["config"]


def davae_config(path: Path) -> dict:
    return read_metadata(path, "davae")["config"]


# ------------------------------------------------------------------ heads files
@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("hidden_size", 60_000_000, "an integer from 1 to 16384"),
        ("hidden_size", -128, "an integer from 1 to 16384"),
        ("patch_size", 0, "an integer from 1 to 16"),
        ("patch_size", 4096, "an integer from 1 to 16"),
        ("detail_channels", -16, "an integer from 1 to 256"),
        ("base_channels", 16.5, "an integer from 1 to 256"),
        ("base_channels", True, "an integer from 1 to 256"),
        ("hidden_size", "128", "an integer from 1 to 16384"),
    ],
)
def test_heads_field_out_of_range_is_refused_naming_file_field_value_and_range(tmp_path, heads_file, field, value, allowed):
    path = with_config(heads_file, tmp_path / "crafted.safetensors", "da_heads", {**heads_config(heads_file), field: value})
    for load in (load_heads, lambda p: read_metadata(p, "da_heads")):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert "crafted.safetensors" in msg and f"'{field}' is {value!r}" in msg and allowed in msg, msg


def test_heads_config_in_range_but_larger_than_the_tensors_is_refused_by_shape(tmp_path, heads_file):
    big = {"hidden_size": 16384, "patch_size": 16, "base_channels": 256, "detail_channels": 256}  # 4 GB if built
    path = with_config(heads_file, tmp_path / "big.safetensors", "da_heads", big)
    with pytest.raises(CheckpointError, match=r"big.safetensors: tensors do not match .*detail_embed.weight: file \(128, 16, 2, 2\) vs config \(16384, 256, 16, 16\)"):
        load_heads(path)


def test_heads_with_a_tensor_too_few_or_too_many_are_refused(tmp_path, heads_file):
    config = heads_config(heads_file)
    state = load_file(str(heads_file))
    fewer = with_config(heads_file, tmp_path / "fewer.safetensors", "da_heads", config, {k: v for k, v in state.items() if k != "detail_out.bias"})
    with pytest.raises(CheckpointError, match="fewer.safetensors: .*1 missing tensors \\(detail_out.bias\\)"):
        load_heads(fewer)
    more = with_config(heads_file, tmp_path / "more.safetensors", "da_heads", config, {**state, "extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="more.safetensors: .*1 unexpected tensors \\(extra.weight\\)"):
        load_heads(more)


def test_heads_metadata_that_is_not_json_or_too_large_is_refused(tmp_path, heads_file):
    for name, text, expected in [
        ("notjson", "{hidden_size: 64", "metadata 'davae_config' is not JSON"),
        ("list", "[64, 2, 16, 16]", "metadata 'davae_config' must be a JSON object, got list"),
        ("nested", "[" * 100_000 + "]" * 100_000, "metadata 'davae_config' is 200000 characters; allowed at most 65536"),
        ("deep", "[" * 30_000 + "]" * 30_000, "metadata 'davae_config' is not JSON"),
        ("missing", "{}", "config field 'hidden_size' is 'missing'"),
    ]:
        path = with_config(heads_file, tmp_path / f"{name}.safetensors", "da_heads", text)
        with pytest.raises(CheckpointError, match=f"{name}.safetensors: .*{expected}"):
            load_heads(path)


def test_duplicate_keys_are_refused(tmp_path, heads_file):
    config = heads_config(heads_file)
    state = load_file(str(heads_file))
    entries = [(k, "F32", list(v.shape), v.numpy().tobytes()) for k, v in state.items()]
    # the same tensor name twice: the safetensors library would silently keep the last one
    dup = write_raw_safetensors(
        tmp_path / "dup_tensor.safetensors", entries + [entries[0]], ours_metadata("da_heads", json.dumps(config))
    )
    for load in (load_heads, read_metadata, load_tensors):
        with pytest.raises(CheckpointError, match=f"dup_tensor.safetensors: the safetensors header has the key '{entries[0][0]}' twice"):
            load(dup)
    # a config key twice: which value is meant is ambiguous (json.loads would take the last)
    text = json.dumps(config)[:-1] + ', "hidden_size": 60000000}'
    dup_cfg = with_config(heads_file, tmp_path / "dup_config.safetensors", "da_heads", text)
    with pytest.raises(CheckpointError, match="dup_config.safetensors: metadata 'davae_config' has the key 'hidden_size' twice"):
        load_heads(dup_cfg)
    # a metadata key twice
    meta = ours_metadata("da_heads", json.dumps(config))
    dup_meta = write_raw_safetensors(tmp_path / "dup_meta.safetensors", entries, meta[:-1] + ', "davae_kind": "davae"}')
    with pytest.raises(CheckpointError, match="dup_meta.safetensors: the safetensors header has the key 'davae_kind' twice"):
        load_heads(dup_meta)


def test_headers_claiming_more_than_the_file_holds_are_refused(tmp_path, heads_file):
    meta = ours_metadata("da_heads", json.dumps(heads_config(heads_file)))
    # a header length of 2**40 bytes in a file of a few bytes
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match=r"huge_header.safetensors: its safetensors header claims 1099511627776 bytes; allowed at most 4194304"):
        load_heads(huge)
    # a tensor whose shape claims 4 GB while 16 bytes are stored
    lying = write_raw_safetensors(tmp_path / "lying.safetensors", [("detail_out.bias", "F32", [2**30], b"\0" * 16)], meta)
    with pytest.raises(CheckpointError, match=r"lying.safetensors: tensor 'detail_out.bias' \(F32 \[1073741824\]\) claims 4294967296 bytes"):
        load_heads(lying)
    negative = write_raw_safetensors(tmp_path / "negative.safetensors", [("detail_out.bias", "F32", [-4], b"")], meta)
    with pytest.raises(CheckpointError, match=r"negative.safetensors: tensor 'detail_out.bias' has shape \[-4\]; allowed"):
        load_heads(negative)


def test_integer_tensors_of_the_right_shape_are_refused(tmp_path, heads_file):
    config = heads_config(heads_file)
    state = load_file(str(heads_file))
    state["detail_out.bias"] = state["detail_out.bias"].to(torch.int64)
    path = with_config(heads_file, tmp_path / "ints.safetensors", "da_heads", config, state)
    with pytest.raises(CheckpointError, match="ints.safetensors: .*1 tensors not floating point \\(detail_out.bias: I64"):
        load_heads(path)


# ------------------------------------------------------------------ DA-VAE files
def _vae_with(config: dict, **base_vae) -> dict:
    return {**config, "base_vae": {**config["base_vae"], **base_vae}}


@pytest.mark.parametrize(
    "change, field, allowed",
    [
        (lambda c: _vae_with(c, block_out_channels=[8, 16, 32, 1_000_000_000]), "base_vae.block_out_channels[3]", "an integer from 1 to 4096"),
        (lambda c: _vae_with(c, block_out_channels=[8] * 50, down_block_types=["DownEncoderBlock2D"] * 50), "base_vae.block_out_channels", "a list of 1 to 8 integers"),
        (lambda c: _vae_with(c, latent_channels=-16), "base_vae.latent_channels", "an integer from 1 to 256"),
        (lambda c: _vae_with(c, layers_per_block=0), "base_vae.layers_per_block", "an integer from 1 to 8"),
        (lambda c: _vae_with(c, layers_per_block=100_000), "base_vae.layers_per_block", "an integer from 1 to 8"),
        (lambda c: _vae_with(c, norm_num_groups=3), "base_vae.norm_num_groups", "a divisor of every block width"),
        (lambda c: _vae_with(c, down_block_types=["CrossAttnDownBlock2D"] * 4), "base_vae.down_block_types", "'DownEncoderBlock2D'"),
        (lambda c: _vae_with(c, act_fn="__import__"), "base_vae.act_fn", "gelu, mish, relu, silu, swish"),
        (lambda c: _vae_with(c, scaling_factor=float("nan")), "base_vae.scaling_factor", "a finite number"),
        (lambda c: {**c, "detail_channels": 0}, "detail_channels", "an integer from 1 to 256"),
        (lambda c: {**c, "detail_channels": 2**40}, "detail_channels", "an integer from 1 to 256"),
        (lambda c: {**c, "decoder_input_order": "reversed"}, "decoder_input_order", "'base_detail' or 'detail_base'"),
        (lambda c: {**c, "base_vae": [1, 2, 3]}, "base_vae", "a JSON object"),
    ],
)
def test_davae_field_out_of_range_is_refused_naming_file_field_and_range(tmp_path, davae_file, change, field, allowed):
    path = with_config(davae_file, tmp_path / "crafted.safetensors", "davae", change(davae_config(davae_file)))
    for load in (load_davae, lambda p: read_metadata(p, "davae")):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert "crafted.safetensors" in msg and f"config field '{field}' is" in msg and allowed in msg, msg


def test_davae_config_in_range_but_larger_than_the_tensors_is_refused_by_shape(tmp_path, davae_file):
    # widest and deepest allowed: several billion parameters if it were built for real
    config = _vae_with(
        davae_config(davae_file), block_out_channels=[4096] * 8, layers_per_block=8,
        down_block_types=["DownEncoderBlock2D"] * 8, up_block_types=["UpDecoderBlock2D"] * 8,
    )
    path = with_config(davae_file, tmp_path / "wide.safetensors", "davae", config)
    with pytest.raises(CheckpointError, match="wide.safetensors: tensors do not match the architecture in its own metadata: .*wrong shapes"):
        load_davae(path)


def test_davae_with_a_tensor_too_few_or_too_many_is_refused(tmp_path, davae_file):
    config = davae_config(davae_file)
    state = load_file(str(davae_file))
    fewer = with_config(davae_file, tmp_path / "fewer.safetensors", "davae", config, {k: v for k, v in state.items() if k != "normalizer.detail_std"})
    with pytest.raises(CheckpointError, match="fewer.safetensors: .*1 missing tensors \\(normalizer.detail_std\\)"):
        load_davae(fewer)
    more = with_config(davae_file, tmp_path / "more.safetensors", "davae", config, {**state, "decoder_up.extra": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="more.safetensors: .*1 unexpected tensors \\(decoder_up.extra\\)"):
        load_davae(more)


def test_davae_metadata_not_json_and_oversized_info_are_refused(tmp_path, davae_file):
    bad = with_config(davae_file, tmp_path / "bad.safetensors", "davae", '{"base_vae": ')
    with pytest.raises(CheckpointError, match="bad.safetensors: metadata 'davae_config' is not JSON"):
        load_davae(bad)
    state = load_file(str(davae_file))
    meta = {"davae_format": "1", "davae_kind": "davae", "davae_config": json.dumps(davae_config(davae_file)),
            "davae_info": json.dumps({"note": "x" * (2 * 1024 * 1024)})}
    save_file(state, str(tmp_path / "info.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="info.safetensors: metadata 'davae_info' is 2097164 characters; allowed at most 1048576"):
        load_davae(tmp_path / "info.safetensors")


def test_valid_files_still_load_and_header_matches_the_library(davae_file, heads_file):
    header = read_safetensors_header(davae_file)
    tensors = load_file(str(davae_file))
    assert {k: e.shape for k, e in header.tensors.items()} == {k: tuple(v.shape) for k, v in tensors.items()}
    assert header.metadata["davae_kind"] == "davae"
    assert load_davae(davae_file).config.to_dict() == davae_config(davae_file)
    assert load_heads(heads_file).config.hidden_size == 128


def test_half_precision_files_load(tmp_path, davae):
    path = save_davae(davae, tmp_path / "half.safetensors", dtype=torch.float16)
    assert read_safetensors_header(path).tensors["decoder_up.conv.weight"].dtype == "F16"
    assert load_davae(path).decoder_up.conv.weight.dtype == torch.float32


# ------------------------------------------------------------------ authors' layout (pickles)
def test_importer_refuses_pickled_tensors_bigger_than_their_storage(tmp_path):
    # one stored float, expanded (stride 0) to a hidden size of 4096: 1 MB of weights claimed from 4 bytes
    sd = {
        "tokenizer_patch_embed.proj.extra_conv.weight": torch.zeros(1).expand(4096, 16, 2, 2),
        "tokenizer_patch_embed.proj.extra_conv.bias": torch.zeros(4096),
        "project_out.extra_linear.weight": torch.zeros(64, 4096),
        "project_out.extra_linear.bias": torch.zeros(64),
    }
    torch.save({"model_state_dict": sd}, tmp_path / "step_1.pt")
    with pytest.raises(CheckpointError, match=r"step_1.pt: tensor 'detail_embed.weight' has shape \(4096, 16, 2, 2\) but its storage holds only 4 bytes"):
        import_heads(tmp_path / "step_1.pt")
    sd["tokenizer_patch_embed.proj.extra_conv.weight"] = torch.zeros(1).expand(60_000_000, 16, 2, 2)
    torch.save({"model_state_dict": sd}, tmp_path / "step_2.pt")
    with pytest.raises(CheckpointError, match="step_2.pt: config field 'hidden_size' is 60000000; allowed: an integer from 1 to 16384"):
        import_heads(tmp_path / "step_2.pt")
    tok = {"dc_down.conv.weight": torch.zeros(8, 32, 3, 3), "dc_up.conv.weight": torch.zeros(1).expand(128, 100_000, 3, 3)}
    torch.save(tok, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: tensor 'dc_up.conv.weight' has shape \(128, 100000, 3, 3\)"):
        import_tokenizer(tmp_path / "pytorch_model.bin")


def test_importer_refuses_derived_architectures_out_of_range_or_not_matching(tmp_path):
    from davae_core import tiny_vae_config

    # dc_up reads 1000 latent channels: 984 base channels, beyond the 256 allowed
    tok = {"dc_down.conv.weight": torch.zeros(8, 32, 3, 3), "dc_up.conv.weight": torch.zeros(128, 1000, 3, 3)}
    torch.save(tok, tmp_path / "wide.bin")
    with pytest.raises(CheckpointError, match="wide.bin: config field 'base_vae.latent_channels' is 984; allowed: an integer from 1 to 256"):
        import_tokenizer(tmp_path / "wide.bin", vae_config=tiny_vae_config())
    # in range but without the trunks: refused from shapes, before the model is built
    tok["dc_up.conv.weight"] = torch.zeros(128, 32, 3, 3)
    torch.save(tok, tmp_path / "bare.bin")
    with pytest.raises(CheckpointError, match="bare.bin: tensors do not match .*missing tensors"):
        import_tokenizer(tmp_path / "bare.bin", vae_config=tiny_vae_config())
    # a config.json with an absurd width
    with pytest.raises(CheckpointError, match=r"config field 'base_vae.block_out_channels\[0\]' is 10000000"):
        import_tokenizer(tmp_path / "bare.bin", vae_config={**tiny_vae_config(), "block_out_channels": [10_000_000, 16, 32, 32]})


def _recompress(src: Path, dst: Path) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, zin.read(item.filename))
    return dst


def test_compressed_or_legacy_pickles_are_refused(tmp_path):
    torch.save({"a": torch.zeros(1000)}, tmp_path / "plain.pt")
    assert torch.equal(load_pickled_state_dict(tmp_path / "plain.pt")["a"], torch.zeros(1000))
    bomb = _recompress(tmp_path / "plain.pt", tmp_path / "bomb.pt")
    with pytest.raises(CheckpointError, match="bomb.pt: .* compressed entries .*inflating them could allocate"):
        load_pickled_state_dict(bomb)
    with pytest.raises(CheckpointError, match="bomb.pt: .* compressed entries"):
        import_heads(bomb)
    torch.save({"a": torch.zeros(10)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy.pt: not a zip-format torch checkpoint"):
        load_pickled_state_dict(tmp_path / "legacy.pt")


# ------------------------------------------------------------------ peak memory of refusals
_MEASURE = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from davae_core import CheckpointError, load_davae, load_heads, read_metadata
    from davae_core.authors_import import import_heads, import_tokenizer
    from davae_core.checkpoint import load_pickled_state_dict

    LOADERS = {"load_davae": load_davae, "load_heads": load_heads, "read_metadata_davae": lambda p: read_metadata(p, "davae"),
               "read_metadata_heads": lambda p: read_metadata(p, "da_heads"), "import_heads": import_heads,
               "import_tokenizer": import_tokenizer, "load_pickled_state_dict": load_pickled_state_dict}

    def status_mb(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    def peak_above_now(fn):
        # peak resident memory during fn() above the resident memory before it; writing 5 to
        # clear_refs resets Linux's high-water mark, so an earlier peak (imports, warm-up)
        # cannot hide an allocation made here
        before = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return status_mb("VmHWM") - before

    load_davae(sys.argv[1]); load_heads(sys.argv[2])  # warm up: lazy imports, allocator pools
    result = {"cases": []}
    for loader, path in json.loads(sys.argv[3]):
        start, refused = time.perf_counter(), []
        def attempt():
            try:
                LOADERS[loader](path)
            except CheckpointError as e:
                refused.append(str(e))
        above = peak_above_now(attempt)
        result["cases"].append({"loader": loader, "path": path, "refused": refused[0] if refused else None,
                                "peak_above_mb": above, "seconds": time.perf_counter() - start})
    # control: the measurement sees a real 400 MB allocation
    result["control_above_mb"] = peak_above_now(lambda: torch.ones(100 * 1024 * 1024).add_(1))
    print(json.dumps(result))
    """
)


def test_refusals_allocate_less_than_200_mb_above_baseline(tmp_path, davae_file, heads_file):
    heads_cfg, vae_cfg = heads_config(heads_file), davae_config(davae_file)
    wide_vae = _vae_with(vae_cfg, block_out_channels=[4096] * 8, layers_per_block=8,
                         down_block_types=["DownEncoderBlock2D"] * 8, up_block_types=["UpDecoderBlock2D"] * 8)
    cases = [
        ("load_heads", with_config(heads_file, tmp_path / "h_huge.safetensors", "da_heads", {**heads_cfg, "hidden_size": 60_000_000})),
        ("load_heads", with_config(heads_file, tmp_path / "h_big.safetensors", "da_heads",
                                   {"hidden_size": 16384, "patch_size": 16, "base_channels": 256, "detail_channels": 256})),
        ("read_metadata_heads", tmp_path / "h_big.safetensors"),
        ("load_davae", with_config(davae_file, tmp_path / "v_wide.safetensors", "davae", wide_vae)),
        ("read_metadata_davae", tmp_path / "v_wide.safetensors"),
        ("load_davae", with_config(davae_file, tmp_path / "v_huge.safetensors", "davae", _vae_with(vae_cfg, block_out_channels=[8, 16, 32, 10**9]))),
    ]
    lying = tmp_path / "lying.safetensors"
    write_raw_safetensors(lying, [("detail_out.bias", "F32", [2**34], b"\0" * 16)], ours_metadata("da_heads", json.dumps(heads_cfg)))
    cases.append(("load_heads", lying))
    sd = {"tokenizer_patch_embed.proj.extra_conv.weight": torch.zeros(1).expand(16384, 256, 16, 16),
          "project_out.extra_linear.weight": torch.zeros(1).expand(65536, 16384)}
    torch.save({"model_state_dict": sd}, tmp_path / "strided.pt")
    cases.append(("import_heads", tmp_path / "strided.pt"))
    torch.save({"dc_down.conv.weight": torch.zeros(8, 32, 3, 3), "dc_up.conv.weight": torch.zeros(1).expand(2048, 10**6, 3, 3)}, tmp_path / "strided.bin")
    cases.append(("import_tokenizer", tmp_path / "strided.bin"))
    torch.save({"a": torch.zeros(64 * 1024 * 1024, dtype=torch.uint8)}, tmp_path / "zeros.pt")
    cases.append(("load_pickled_state_dict", _recompress(tmp_path / "zeros.pt", tmp_path / "bomb.pt")))

    args = json.dumps([(loader, str(path)) for loader, path in cases])
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(davae_file), str(heads_file), args],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    for case in result["cases"]:
        assert case["refused"] and Path(case["path"]).name in case["refused"], case
        assert case["peak_above_mb"] < 200, f"{case['loader']}({Path(case['path']).name}) peaked {case['peak_above_mb']:.0f} MB above baseline"
    assert result["control_above_mb"] > 250, "the measurement must see a 400 MB allocation above 200 MB"


# ------------------------------------------------------------------ shapes without diffusers
@pytest.mark.parametrize("attention, quant, layers, with_base", [(True, False, 1, True), (False, True, 2, True), (True, True, 1, False)])
def test_davae_param_shapes_equal_a_meta_build_of_the_model(attention, quant, layers, with_base):
    from davae_core import tiny_vae_config
    from davae_core.davae_model import DAVAE, SD3_VAE_CONFIG, DAVAEConfig
    from davae_core.davae_param_shapes import davae_state_shapes

    for vae in (tiny_vae_config(attention), SD3_VAE_CONFIG):
        config = DAVAEConfig(base_vae={**vae, "use_quant_conv": quant, "layers_per_block": layers, "mid_block_add_attention": attention})
        with torch.device("meta"):
            model = DAVAE(config, with_base_encoder=with_base)
        assert davae_state_shapes(config.to_dict(), with_base) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
