"""`emu3 train-vq`: identity-initialised temporal layers, the warm-up and codebook fit, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emu3.errors import InputError
from emu3.train import vq as tvq
from emu3.vq import VisionVQ, vq_config


def test_temporal_layers_start_as_identities():
    model = VisionVQ(vq_config("tiny"))
    tvq.init_temporal_identity(model, shift=3.0)
    z = torch.randn(2, model.config.z_channels, 8, 4, 4)  # (B, C, T, h, w)
    assert torch.equal(model.post_quant_conv(z), z)
    torch.testing.assert_close(model.quant_conv(z), z - 3.0)
    up = model.decoder.time_conv
    torch.testing.assert_close(up[0](z), torch.repeat_interleave(z, 2, dim=2) + 3.0)
    assert torch.equal(up[1](z), torch.repeat_interleave(z, 2, dim=2))
    down = model.encoder.time_conv
    torch.testing.assert_close(down[0](z), z[:, :, 1::2] + 3.0)  # the newest frame each output sees
    assert torch.equal(down[1](z), z[:, :, 1::2])


def test_kmeans_codebook_covers_the_latents():
    cfg = tvq.VQTrainConfig(preset="tiny", video_every=0)
    model = VisionVQ(vq_config("tiny"))
    tvq._init_codebook(model, cfg, images=128)
    x, _ = tvq._batch(1 << 40, tvq.VQTrainConfig(**{**cfg.__dict__, "batch_size": 64}))
    codes = model.quantize(model.encode_latents(x))
    assert len(torch.unique(codes)) > 0.5 * model.config.codebook_size  # not collapsed onto a few codes


def test_config_is_validated():
    with pytest.raises(InputError, match="ae_warmup"):
        tvq.VQTrainConfig(steps=200, ae_warmup=200).validate()
    with pytest.raises(InputError, match="warmup=100"):
        tvq.VQTrainConfig(steps=50).validate()
    with pytest.raises(InputError, match="key=value"):
        tvq.make_vq_config("tiny", ["stepz=3"])


def test_stopped_run_resumes_exactly(tmp_path, monkeypatch):
    """A run killed mid-way (after a checkpoint, inside the warm-up) and restarted ends bit-identical to
    one that never stopped: weights, codebook and the metrics log."""
    common = ["steps=10", "ae_warmup=4", "save_every=3", "restart_every=3", "eval_images=4"]
    whole = tvq.train_vq(tvq.make_vq_config("tiny", common + [f"out={tmp_path / 'a'}"]), progress=False)

    real_batch, calls = tvq._batch, []

    def dying(step, cfg):
        calls.append(step)
        if step == 7:
            raise KeyboardInterrupt
        return real_batch(step, cfg)

    cfg = tvq.make_vq_config("tiny", common + [f"out={tmp_path / 'b'}"])
    monkeypatch.setattr(tvq, "_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        tvq.train_vq(cfg, progress=False)
    monkeypatch.setattr(tvq, "_batch", real_batch)
    resumed = tvq.train_vq(cfg, progress=False)
    assert whole == resumed
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "tokenizer" / "model.safetensors")
    b = load_file(tmp_path / "b" / "tokenizer" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: (tmp_path / d / "metrics.csv").read_text().splitlines()  # noqa: E731
    assert [r.split(",")[:3] for r in rows("a")] == [r.split(",")[:3] for r in rows("b")]
    assert len(rows("b")) == 11
    result = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert set(result) >= {"image_psnr", "codebook_usage", "detector_agreement"}
    assert np.isfinite(result["image_psnr"])


def test_fine_tune_starts_from_init_and_sees_table_frames(tmp_path):
    """init=DIR continues that tokenizer (at lr 0 its weights come out unchanged, codebook included; the
    temporal BatchNorms' running statistics do move) and table=F
    mixes the table-top task's frames into the batches; the table reconstruction PSNR is reported."""
    from safetensors.torch import load_file

    from emu3.vision import VisionTokenizer

    VisionTokenizer.from_preset("tiny", seed=3).save_pretrained(tmp_path / "init")
    cfg = tvq.make_vq_config("tiny", [f"init={tmp_path / 'init'}", f"out={tmp_path / 'ft'}", "steps=6", "warmup=1",
                                      "lr=0", "min_lr=0", "table=0.5", "video_every=0", "eval_images=4"])
    result = tvq.train_vq(cfg, progress=False)
    a = load_file(tmp_path / "init" / "model.safetensors")
    b = load_file(tmp_path / "ft" / "tokenizer" / "model.safetensors")
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.endswith(stats))
    assert 5 < result["table_psnr"] < 60
    x, video = tvq._batch(0, cfg)
    assert not video and x.shape[0] == cfg.batch_size
    frames = tvq.table_frames(np.random.default_rng(0), 4)
    assert [f.shape for f in frames] == [(64, 64, 3)] * 4
    with pytest.raises(InputError, match="table"):
        tvq.make_vq_config("tiny", ["table=1.5"]).validate()
    with pytest.raises(InputError, match="init="):
        tvq.make_vq_config("tiny", [f"init={tmp_path}"]).validate()
    with pytest.raises(InputError, match="ae_warmup"):
        tvq.make_vq_config("tiny", [f"init={tmp_path / 'init'}", "ae_warmup=5"]).validate()


def test_decoder_only_fine_tune_keeps_every_code(tmp_path):
    """train=decoder: the decoder side learns, the encoder (BatchNorm statistics included), quant_conv and
    codebook come out bit for bit, so images and clips keep their codes."""
    from safetensors.torch import load_file

    from emu3.vision import VisionTokenizer
    from emu3.world.motion import sample_clip
    from emu3.world.scenes import render, sample_scene

    VisionTokenizer.from_preset("tiny", seed=3).save_pretrained(tmp_path / "init")
    cfg = tvq.make_vq_config("tiny", [f"init={tmp_path / 'init'}", f"out={tmp_path / 'ft'}", "steps=6", "warmup=1",
                                      "train=decoder", "video_every=2", "restart_every=2", "eval_images=4"])
    tvq.train_vq(cfg, progress=False)
    a = load_file(tmp_path / "init" / "model.safetensors")
    b = load_file(tmp_path / "ft" / "tokenizer" / "model.safetensors")
    decoder = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert all(torch.equal(a[k], b[k]) for k in a if k not in decoder)
    assert sum(not torch.equal(a[k], b[k]) for k in decoder if "weight" in k) > 10
    before, after = (VisionTokenizer.from_pretrained(tmp_path / d) for d in ("init", "ft/tokenizer"))
    rng = np.random.default_rng(0)
    image, clip = render(sample_scene(rng)), sample_clip(rng, 8).render()
    assert torch.equal(before.encode_image(image), after.encode_image(image))
    assert torch.equal(before.encode_video(clip, "causal"), after.encode_video(clip, "causal"))
    with pytest.raises(InputError, match="init=DIR"):
        tvq.make_vq_config("tiny", ["train=decoder"]).validate()
    with pytest.raises(InputError, match="'all' or 'decoder'"):
        tvq.make_vq_config("tiny", ["train=encoder"]).validate()
