"""Numerical parity with transformers' Emu3VQVAE, through every checkpoint layout we load.

For each small random configuration: the same weights reach our model through (a) a released-layout
folder we wrote, (b) a folder written by `Emu3VQVAE.save_pretrained`, (c) a sharded full `Emu3-*-hf`
folder written by `Emu3ForConditionalGeneration.save_pretrained`; encode must give identical codes
and decode must agree within 1e-5, for images and for videos.
"""

from __future__ import annotations

import pytest
import torch

from emu3.checkpoint import load_vq, save_vq
from emu3.reference import emu3_vqvae
from tests.conftest import small_vq

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "tiny": dict(),
    "two-levels-t2": dict(ch=32, ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[1], temporal_downsample_factor=2,
                          codebook_size=128),
    "four-levels-embed8": dict(ch=64, ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[3], embed_dim=8,
                               z_channels=8, codebook_size=256),
    "no-temporal": dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[1], temporal_downsample_factor=1),
}


def full_hf_folder(ref, path):
    """Write an Emu3-*-hf style folder (tiny LM + this VQ), sharded with an index."""
    vq = ref.config.to_dict()
    text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.Emu3Config(vq_config=vq, text_config=text, vocabulary_map={"<image>": 3})
    full = transformers.Emu3ForConditionalGeneration(cfg)
    full.model.vqmodel.load_state_dict(ref.state_dict())
    full.save_pretrained(path, max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").exists()


def check_against(ours, ref, cfg_name):
    s, f = ours.config.spatial_factor, ours.config.temporal_factor
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 8 * s, 8 * s), (1, 3, 6 * s, 10 * s)]:
        x = torch.rand(*shape, generator=g) * 2 - 1
        with torch.no_grad():
            ref_codes = torch.stack(ref.encode(x, image_sizes=torch.tensor([shape[2:]] * shape[0])).image_tokens)
            ref_pixels = ref.decode(ref_codes)
        codes = ours.encode(x)
        assert torch.equal(codes, ref_codes), cfg_name
        assert codes.unique().numel() > 3
        torch.testing.assert_close(ours.decode(ref_codes), ref_pixels, rtol=0, atol=1e-5)
    for frames in (f, 2 * f):
        v = torch.rand(2, frames, 3, 4 * s, 6 * s, generator=g) * 2 - 1
        with torch.no_grad():
            ref_codes = torch.stack(ref.encode(v, image_sizes=torch.tensor([[4 * s, 6 * s]] * 2)).image_tokens)
            ref_pixels = ref.decode(ref_codes)
        codes = ours.encode(v)
        assert codes.shape == (2, frames // f, 4, 6)
        assert torch.equal(codes, ref_codes), cfg_name
        torch.testing.assert_close(ours.decode(ref_codes), ref_pixels, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_through_every_layout(name, tmp_path):
    ours = small_vq(11, **CONFIGS[name])
    ref = emu3_vqvae(ours)
    check_against(ours, ref, name)

    save_vq(ours, tmp_path / "released")
    check_against(load_vq(tmp_path / "released"), ref, name)

    ref.save_pretrained(tmp_path / "transformers")
    check_against(load_vq(tmp_path / "transformers"), ref, name)

    full_hf_folder(ref, tmp_path / "hf-full")
    check_against(load_vq(tmp_path / "hf-full"), ref, name)


def test_our_transformers_layout_loads_in_transformers(tmp_path):
    ours = small_vq(12)
    save_vq(ours, tmp_path / "hf", layout="transformers")
    ref, info = transformers.Emu3VQVAE.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    check_against(ours, ref.eval(), "ours->transformers")
