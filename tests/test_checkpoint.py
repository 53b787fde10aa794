import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from davae_core import CheckpointError, load_davae, load_heads, read_metadata, save_davae, save_heads
from davae_core.checkpoint import load_pickled_state_dict
from davae_core.fixtures import random_heads, tiny_transformer


def test_davae_metadata_round_trip(tmp_path, davae):
    davae.normalizer.set_detail_statistics(torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16))
    try:
        path = save_davae(davae, tmp_path / "m.safetensors", info={"note": "unit test"})
        meta = read_metadata(path, "davae")
        assert meta["kind"] == "davae" and meta["version"] == "1"
        assert meta["config"] == json.loads(json.dumps(davae.config.to_dict()))
        info = meta["info"]
        assert (info["base_channels"], info["detail_channels"], info["factor"]) == (16, 16, 16)
        assert info["normalization"]["base"] == {"shift": 0.0609, "scale": 1.5305}
        assert info["has_base_encoder"] and info["note"] == "unit test"
        loaded = load_davae(path)
        for k, v in davae.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        image = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(loaded.decode(loaded.encode(image)), davae.decode(davae.encode(image)))
    finally:
        davae.normalizer.set_detail_statistics(torch.zeros(16), torch.ones(16))


def test_davae_without_base_encoder_loads_headless(tmp_path, davae):
    path = save_davae(davae, tmp_path / "m.safetensors", include_base_encoder=False)
    assert not any(k.startswith("base_encoder.") for k in load_file(str(path)))
    loaded = load_davae(path)
    assert loaded.base_encoder is None
    assert read_metadata(path)["info"]["has_base_encoder"] is False


def test_heads_round_trip_with_and_without_base_layers(tmp_path):
    model = tiny_transformer(seed=0)
    heads = random_heads(model, seed=4)
    path = save_heads(heads, tmp_path / "h.safetensors")
    back = load_heads(path)
    assert back.config == heads.config and back.base_embed is None
    assert torch.equal(back.detail_out.weight, heads.detail_out.weight)
    heads.set_base_layers(model.pos_embed.proj, model.proj_out)
    path = save_heads(heads, tmp_path / "h2.safetensors")
    back = load_heads(path)
    assert torch.equal(back.base_embed.weight, model.pos_embed.proj.weight)
    assert torch.equal(back.base_out.bias, model.proj_out.bias)


def test_foreign_safetensors_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "sd3_vae.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="sd3_vae.safetensors: not a DA-VAE file.*authors_import"):
        load_davae(path)


def test_wrong_kind_is_refused(tmp_path, davae):
    heads_path = save_heads(random_heads(tiny_transformer(0)), tmp_path / "h.safetensors")
    with pytest.raises(CheckpointError, match="holds DA heads for an MMDiT, not a DA-VAE tokenizer"):
        load_davae(heads_path)
    vae_path = save_davae(davae, tmp_path / "v.safetensors")
    with pytest.raises(CheckpointError, match="holds a DA-VAE tokenizer, not DA heads"):
        load_heads(vae_path)


def test_wrong_shapes_are_refused_naming_the_tensor(tmp_path, davae):
    path = save_davae(davae, tmp_path / "m.safetensors")
    meta = read_metadata(path)
    state = load_file(str(path))
    state["decoder_up.conv.weight"] = state["decoder_up.conv.weight"][:, :20].contiguous()
    header = {"davae_format": "1", "davae_kind": "davae", "davae_config": json.dumps(meta["config"]), "davae_info": "{}"}
    save_file(state, str(path), metadata=header)
    with pytest.raises(CheckpointError, match=r"decoder_up.conv.weight: file \(128, 20, 3, 3\) vs config \(128, 32, 3, 3\)"):
        load_davae(path)


def test_missing_tensors_are_refused(tmp_path, davae):
    path = save_davae(davae, tmp_path / "m.safetensors")
    meta = read_metadata(path)
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("detail_down.")}
    header = {"davae_format": "1", "davae_kind": "davae", "davae_config": json.dumps(meta["config"]), "davae_info": "{}"}
    save_file(state, str(path), metadata=header)
    with pytest.raises(CheckpointError, match="2 missing tensors"):
        load_davae(path)


def test_truncated_file_is_refused(tmp_path, davae):
    path = save_davae(davae, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors: .*truncated"):
        load_davae(path)


def test_not_safetensors_and_missing_files_are_refused(tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x00\x01 definitely not a tensor file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_metadata(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        read_metadata(tmp_path / "absent.safetensors")


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"davae_format": "99", "davae_kind": "davae"})
    with pytest.raises(CheckpointError, match="format version 99"):
        read_metadata(path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_load_weights_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, good)
    assert torch.equal(load_pickled_state_dict(good)["a"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    torch.save({"a": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_pickled_state_dict(evil)


def test_writes_are_atomic(tmp_path, davae, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_davae(davae, path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("davae_core.checkpoint.save_file", crash)
    with pytest.raises(OSError):
        save_davae(davae, path)
    assert path.read_bytes() == before  # the good file survives a failed export
