"""The VQ model itself: released key/shape set, config validation, fast paths vs their slow twins."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

from emu3.errors import InputError
from emu3.vq import (
    AttnBlock,
    SpatialNorm,
    Upsample,
    VisionVQ,
    VQConfig,
    num_parameters,
    released_computation,
    vq_config,
)
from tests.conftest import assert_twins_agree, small_vq


def released_state_shapes() -> dict[str, tuple[int, ...]]:
    """The released Emu3-VisionTokenizer state dict, written out from reference section 1.7
    (independently of emu3.vq's module code)."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(p, cout, cin, k):
        keys[p + ".weight"] = (cout, cin, *k)
        keys[p + ".bias"] = (cout,)

    def gn(p, c):
        keys[p + ".weight"] = (c,)
        keys[p + ".bias"] = (c,)

    def bn(p, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{p}.{n}"] = (c,)
        keys[p + ".num_batches_tracked"] = ()

    def spatial(p, c):
        gn(p + ".norm_layer", c)
        conv(p + ".conv_y", c, 4, (1, 1))
        conv(p + ".conv_b", c, 4, (1, 1))

    def res(p, cin, cout, norm):
        norm(p + ".norm1", cin)
        conv(p + ".conv1", cout, cin, (3, 3))
        norm(p + ".norm2", cout)
        conv(p + ".conv2", cout, cout, (3, 3))
        if cin != cout:
            conv(p + ".nin_shortcut", cout, cin, (1, 1))

    def attn(p, c, norm):
        norm(p + ".norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{n}", c, c, (1, 1))

    def temporal(p):
        bn(p + ".norm1", 4)
        conv(p + ".conv1.conv", 4, 4, (3, 3, 3))
        bn(p + ".norm2", 4)
        conv(p + ".conv2.conv", 4, 4, (3, 3, 3))

    chans = [256, 512, 512, 1024]
    conv("encoder.conv_in", 256, 3, (3, 3))
    cin = 256
    for i, c in enumerate(chans):
        for j in range(2):
            res(f"encoder.down.{i}.block.{j}", cin, c, gn)
            cin = c
            if i == 3:
                attn(f"encoder.down.3.attn.{j}", c, gn)
        if i < 3:
            conv(f"encoder.down.{i}.downsample.conv", c, c, (3, 3))
    res("encoder.mid.block_1", 1024, 1024, gn)
    attn("encoder.mid.attn_1", 1024, gn)
    res("encoder.mid.block_2", 1024, 1024, gn)
    gn("encoder.norm_out", 1024)
    conv("encoder.conv_out", 4, 1024, (3, 3))
    for i in range(2):
        conv(f"encoder.time_conv.{i}.conv.conv", 4, 4, (4, 3, 3))
        temporal(f"encoder.time_res_stack.{i}")
    conv("quant_conv.conv", 4, 4, (3, 1, 1))
    conv("post_quant_conv.conv", 4, 4, (3, 1, 1))
    keys["quantize.embedding.weight"] = (32768, 4)
    for i in range(2):
        temporal(f"decoder.time_res_stack.{i}")
        conv(f"decoder.time_conv.{i}.conv.conv", 4, 4, (3, 3, 3))
    conv("decoder.conv_in", 1024, 4, (3, 3))
    res("decoder.mid.block_1", 1024, 1024, spatial)
    attn("decoder.mid.attn_1", 1024, spatial)
    res("decoder.mid.block_2", 1024, 1024, spatial)
    cin = 1024
    for i in (3, 2, 1, 0):
        for j in range(3):
            res(f"decoder.up.{i}.block.{j}", cin, chans[i], spatial)
            cin = chans[i]
            if i == 3:
                attn(f"decoder.up.3.attn.{j}", chans[i], spatial)
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", chans[i], chans[i], (3, 3))
    spatial("decoder.norm_out", 256)
    conv("decoder.conv_out", 3, 256, (3, 3))
    return keys


def test_full_size_state_dict_equals_released_list():
    with torch.device("meta"):
        model = VisionVQ(vq_config("emu3"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    released = released_state_shapes()
    assert len(released) == 495
    assert ours == released
    assert num_parameters(model) == 270_740_287


def test_full_size_maps_one_to_one_onto_transformers():
    transformers = pytest.importorskip("transformers")
    from emu3.checkpoint import hf_vq_shape, vq_key_map

    with torch.device("meta"):
        ref = transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig())
        ours = VisionVQ(vq_config("emu3"))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mapping = vq_key_map(ours.config)
    mapped = {mapping[k]: hf_vq_shape(mapping[k], tuple(v.shape)) for k, v in ours.state_dict().items()}
    assert len(set(mapping.values())) == len(mapping) == 495
    assert mapped == ref_shapes


@pytest.mark.parametrize("bad, match", [
    (dict(z_channels=8), "must equal embed_dim"),
    (dict(double_z=True), "double_z"),
    (dict(ch=48), "multiples of norm_groups"),
    (dict(ch=32, norm_groups=12), "multiples of norm_groups"),
    (dict(attn_resolutions=[4]), "level indices"),
    (dict(temporal_downsample_factor=3), "power of 2"),
    (dict(dropout=1.5), "dropout"),
])
def test_config_validation(bad, match):
    with pytest.raises(InputError, match=match):
        VQConfig(**bad)


def test_config_json_round_trip_and_unknown_fields():
    cfg = vq_config("tiny")
    d = {"architectures": ["Emu3VisionVQModel"], "model_type": "Emu3VisionVQ", "transformers_version": "4.44.0",
         **cfg.to_dict()}
    assert VQConfig.from_dict(d) == cfg
    with pytest.raises(InputError, match="unknown VQ config fields: bogus"):
        VQConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(InputError, match="unknown VQ preset"):
        vq_config("huge")


def _model_twins(model, x):
    """fast(dtype), slow(dtype): latents, codes (as floats) and the decoded pixels of the codes that the
    float64 slow path picks (so both paths decode the same codes)."""
    with released_computation():
        codes = copy.deepcopy(model).double().encode(x.double())

    def run(dtype, fast=True):
        m = copy.deepcopy(model).to(dtype)
        with torch.no_grad(), contextlib.nullcontext() if fast else released_computation():
            return [m.encode_latents(x.to(dtype)), m.encode(x.to(dtype)).double(), m.decode(codes)]

    return run, functools.partial(run, fast=False)


def test_image_fast_path_equals_released_computation():
    model = small_vq(1)
    x = torch.rand(3, 3, 24, 40) * 2 - 1
    fast = model.encode(x)
    assert fast.shape == (3, 6, 10)
    assert fast.unique().numel() > 5  # the codebook is really used
    assert model.decode(fast).shape == (3, 3, 24, 40)
    run_fast, run_slow = _model_twins(model, x)
    # codes are an argmin, so equal in float64; in float32 a near-tie may go either way on another CPU
    assert torch.equal(run_fast(torch.float64)[1], run_slow(torch.float64)[1])
    assert_twins_agree(lambda d: [run_fast(d)[i] for i in (0, 2)], lambda d: [run_slow(d)[i] for i in (0, 2)])


def test_fast_paths_equal_released_computation():
    model = small_vq(2)
    x = torch.rand(2, 8, 3, 16, 24) * 2 - 1
    run_fast, run_slow = _model_twins(model, x)
    assert torch.equal(run_fast(torch.float64)[1], run_slow(torch.float64)[1])
    assert_twins_agree(lambda d: [run_fast(d)[i] for i in (0, 2)], lambda d: [run_slow(d)[i] for i in (0, 2)])
    with released_computation():
        assert not AttnBlock.use_sdpa and not Upsample.use_subpixel and not SpatialNorm.use_fused
    assert AttnBlock.use_sdpa and Upsample.use_subpixel and SpatialNorm.use_fused and VisionVQ.channels_last


@pytest.mark.parametrize("module, inputs", [
    (lambda: Upsample(32), lambda: (torch.randn(2, 32, 5, 7),)),
    (lambda: SpatialNorm(64, 4), lambda: (torch.randn(2, 64, 16, 12), torch.randn(2, 4, 4, 3))),
    (lambda: AttnBlock(32), lambda: (torch.randn(2, 32, 6, 5),)),
])
def test_each_fast_block_matches_its_twin_with_gradients(module, inputs):
    torch.manual_seed(0)
    block, args = module(), inputs()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    assert_twins_agree(*_block_twins(block, args))


def _block_twins(block, args):
    """fast(dtype), slow(dtype): the block's output and the gradients of sum(out^2) for its inputs and
    parameters, with the fast paths on and off."""
    def run(dtype, fast=True):
        b = copy.deepcopy(block).to(dtype)
        xs = [a.to(dtype).requires_grad_() for a in args]
        with contextlib.nullcontext() if fast else released_computation():
            out = b(*xs)
            out.pow(2).sum().backward()
        return [out.detach()] + [x.grad for x in xs] + [p.grad for p in b.parameters()]

    return run, functools.partial(run, fast=False)


def test_twin_check_catches_a_small_real_difference(monkeypatch):
    """The tolerance above must not hide a bug: a fast Upsample off by one part in 10,000 fails it."""
    torch.manual_seed(0)
    block, args = Upsample(32), (torch.randn(2, 32, 5, 7),)
    fast_forward = Upsample.forward

    def broken(self, x):
        out = fast_forward(self, x)
        return out * (1 + 1e-4) if self.use_subpixel else out

    monkeypatch.setattr(Upsample, "forward", broken)
    with pytest.raises(AssertionError, match="float64 twins differ"):
        assert_twins_agree(*_block_twins(block, args))


def test_frame_batch_does_not_change_results():
    """Frames per forward pass change only the batch the kernels see: the same math (float64), and in
    float32 no more rounding than the one-pass decode's own (kernels block batches differently)."""
    model = small_vq(3)
    x = torch.rand(2, 8, 3, 16, 24) * 2 - 1
    codes = model.encode(x)
    assert torch.equal(copy.deepcopy(model).double().encode(x.double(), frame_batch=3),
                       copy.deepcopy(model).double().encode(x.double()))

    def decode(dtype, frame_batch=None):
        with torch.no_grad():
            return [copy.deepcopy(model).to(dtype).decode(codes, frame_batch=frame_batch)]

    assert_twins_agree(functools.partial(decode, frame_batch=5), decode)


def test_encode_is_causal_in_time():
    model = small_vq(4)
    x = torch.rand(1, 8, 3, 16, 16) * 2 - 1
    y = x.clone()
    y[:, 4:] = torch.rand_like(y[:, 4:])
    cx, cy = model.encode(x), model.encode(y)
    assert torch.equal(cx[:, 0], cy[:, 0])  # latent frame 0 sees only frames 0-3
    assert not torch.equal(cx[:, 1], cy[:, 1])


def test_inference_uses_running_stats_and_restores_mode():
    model = small_vq(5)
    x = torch.rand(2, 4, 3, 16, 16) * 2 - 1
    codes = model.encode(x)
    model.train()
    assert torch.equal(model.encode(x), codes)  # BatchNorm used running statistics
    assert model.training  # and the caller's mode is back
    bn = model.encoder.time_res_stack[0].norm1
    assert int(bn.num_batches_tracked) == 7  # statistics untouched


def test_quantizer_chunked_argmin_equals_bruteforce():
    cfg = VQConfig(codebook_size=1 << 16, ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[])
    model = VisionVQ(cfg)
    torch.nn.init.normal_(model.quantize.embedding.weight)
    z = torch.randn(1, 4, 1, 30, 40)  # 1200 vectors; 65536 codes -> blocks of 256 rows
    codes = model.quantize(z)
    flat = z.permute(0, 2, 3, 4, 1).reshape(-1, 4)
    expected = torch.cdist(flat.double(), model.quantize.embedding.weight.double()).argmin(1)
    assert torch.equal(codes.flatten(), expected)


def test_bad_pixels_and_codes_are_refused():
    model = small_vq(6)
    with pytest.raises(InputError, match="multiples of 4"):
        model.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(InputError, match="multiple of 4 frames"):
        model.encode(torch.zeros(1, 6, 3, 16, 16))
    with pytest.raises(InputError, match=r"in \[0, 64\)"):
        model.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(InputError, match="integers"):
        model.decode(torch.zeros(1, 4, 4))


def test_bfloat16_weights_give_close_codes():
    model = small_vq(7)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(x)
    half = small_vq(7).to(torch.bfloat16)
    codes_bf16 = half.encode(x)
    assert codes_bf16.dtype == torch.long
    assert (codes_bf16 == codes).float().mean() > 0.5
    assert half.decode(codes_bf16).dtype == torch.bfloat16
