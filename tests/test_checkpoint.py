"""Checkpoint folders: released config fields, strict loading errors, no pickle, atomic saves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from emu3 import checkpoint
from emu3.checkpoint import load_vq, save_vq
from emu3.errors import CheckpointError
from tests.conftest import small_vq

RELEASED_FIELDS = {"codebook_size", "embed_dim", "z_channels", "double_z", "in_channels", "out_channels",
                   "temporal_downsample_factor", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout"}


@pytest.fixture
def folder(tmp_path):
    save_vq(small_vq(0), tmp_path / "vq")
    return tmp_path / "vq"


def test_released_layout_files_and_fields(folder):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "Emu3VisionVQ" and cfg["architectures"] == ["Emu3VisionVQModel"]
    assert set(cfg) - {"model_type", "architectures", "torch_dtype"} == RELEASED_FIELDS
    model = load_vq(folder)
    assert not model.training
    for k, v in small_vq(0).state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_round_trip_through_transformers_layout(folder, tmp_path):
    model = load_vq(folder)
    save_vq(model, tmp_path / "hf", layout="transformers")
    keys = load_file(tmp_path / "hf" / "model.safetensors").keys()
    assert "encoder.down_block.down.2.attn.0.q_proj.weight" in keys
    again = load_vq(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_norm_groups_round_trip_released_only(tmp_path):
    from emu3.vq import VisionVQ, vq_config

    torch.manual_seed(0)
    model = VisionVQ(vq_config("tiny", norm_groups=8))
    assert model.encoder.norm_out.num_groups == 8 and model.decoder.norm_out.norm_layer.num_groups == 8
    save_vq(model, tmp_path / "vq")
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["norm_groups"] == 8
    again = load_vq(tmp_path / "vq")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(again.encode(x), model.eval().encode(x))
    with pytest.raises(CheckpointError, match="GroupNorm has 8 groups and transformers. Emu3VQVAE fixes 32"):
        save_vq(model, tmp_path / "hf", layout="transformers")


def test_load_dtype_and_device(folder):
    model = load_vq(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.encoder.time_res_stack[0].norm1.num_batches_tracked.dtype == torch.long


def _rewrite(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_key_is_named(folder):
    _rewrite(folder, lambda s: s.pop("encoder.conv_in.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing \(encoder\.conv_in\.weight\)"):
        load_vq(folder)


def test_unexpected_key_is_named(folder):
    _rewrite(folder, lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected \(encoder\.extra\.weight\)"):
        load_vq(folder)


def test_misshaped_key_is_named(folder):
    _rewrite(folder, lambda s: s.update({"quantize.embedding.weight": torch.zeros(65, 4)}))
    message = r"1 misshaped \(quantize\.embedding\.weight: file \[65, 4\] vs model \[64, 4\]\)"
    with pytest.raises(CheckpointError, match=message):
        load_vq(folder)


def test_config_that_disagrees_with_weights(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["codebook_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="misshaped"):
        load_vq(folder)


def test_pickle_weights_are_refused_without_unpickling(folder):
    (folder / "model.safetensors").unlink()
    marker = folder / "executed"
    # A pickle that would create a file if anything unpickled it.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(CheckpointError, match="only pickle weights .*never unpickles"):
        load_vq(folder)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", b"\xff" * 64])
def test_corrupt_safetensors(folder, content):
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_vq(folder)


def test_truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_vq(folder)


def test_bad_config_files(folder, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_vq(tmp_path / "nope")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_vq(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not a vision tokenizer config"):
        load_vq(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "Emu3VisionVQ", "ch": 48}))
    with pytest.raises(CheckpointError, match="multiples of norm_groups"):
        load_vq(folder)


def test_index_naming_missing_shard(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="names shard gone.safetensors, which is missing"):
        load_vq(folder)


def test_save_replaces_atomically_and_failure_keeps_old(folder, monkeypatch):
    other = small_vq(5)
    save_vq(other, folder)  # replace an existing folder
    assert torch.equal(load_vq(folder).quantize.embedding.weight, other.quantize.embedding.weight)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_vq(small_vq(6), folder)
    assert torch.equal(load_vq(folder).quantize.embedding.weight, other.quantize.embedding.weight)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["vq"]  # no temporary folders left


def test_saved_files_are_readable_like_any_other(folder):
    """safetensors creates its files 0600; a shipped or shared model folder must follow the umask."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    save_vq(small_vq(3), folder)
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path.name
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
