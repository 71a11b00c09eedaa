"""VisionTokenizer: batching, both video modes, frame padding, streaming equals direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emu3.errors import InputError
from emu3.media import ImageProcessor, to_pixels, to_uint8
from emu3.vision import PRESET_PROCESSORS, VisionTokenizer, pad_frames
from tests.conftest import scene, small_vq


@pytest.fixture
def tok():
    return VisionTokenizer(small_vq(21), PRESET_PROCESSORS["tiny"], frame_batch=3)


def test_encode_images_batches_by_size_and_equals_one_by_one(tok):
    images = [Image.fromarray(scene(40, 40, 1)), Image.fromarray(scene(24, 56, 2)), Image.fromarray(scene(40, 40, 3))]
    batched = tok.encode_images(images)
    singles = [tok.encode_image(im) for im in images]
    assert [c.shape for c in batched] == [(10, 10), (6, 14), (10, 10)]
    assert all(torch.equal(a, b) for a, b in zip(batched, singles))
    decoded = tok.decode_image(batched[1])
    assert decoded.shape == (24, 56, 3) and decoded.dtype == np.uint8
    assert tok.decode_image(torch.stack([batched[0], batched[2]])).shape == (2, 40, 40, 3)


def test_pad_frames_repeats_the_last_frame():
    frames = np.arange(6)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3).astype(np.uint8)
    assert pad_frames(frames, 4)[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 5, 5]
    assert len(pad_frames(frames[:1], 4)) == 4 and len(pad_frames(frames[:4], 4)) == 4
    with pytest.raises(InputError, match="at least one frame"):
        pad_frames(frames[:0], 4)


def video(t=8, h=16, w=24):
    return np.stack([np.roll(scene(h, w, 5), 2 * i, axis=1) for i in range(t)])


def test_chunks_mode_equals_independent_clips(tok):
    frames = video(12)
    codes = tok.encode_video(frames, "chunks")
    direct = tok.model.encode(to_pixels(frames).view(3, 4, 3, 16, 24))[:, 0]  # three clips of 4
    assert codes.shape == (3, 4, 6) and torch.equal(codes, direct)
    out = tok.decode_video(codes, "chunks")
    assert out.shape == (12, 16, 24, 3)
    assert np.array_equal(out, to_uint8(tok.model.decode(codes[:, None]).flatten(0, 1)))


def test_causal_mode_streams_but_equals_one_pass(tok):
    frames = video(12)
    codes = tok.encode_video(frames, "causal")  # frame_batch=3: the 2D encoder runs in 4 pieces
    direct = tok.model.encode(to_pixels(frames)[None])[0]
    assert codes.shape == (3, 4, 6) and torch.equal(codes, direct)
    out = tok.decode_video(codes, "causal")
    expected = to_uint8(tok.model.decode(codes[None])[0])
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # rounding of 1e-6 differences
    assert not torch.equal(codes[1:], tok.encode_video(frames, "chunks")[1:])  # the modes really differ


def test_odd_frame_counts_pad_and_trim(tok):
    frames = video(6)
    for mode in ("chunks", "causal"):
        codes = tok.encode_video(frames, mode)
        assert codes.shape[0] == 2
        assert torch.equal(codes, tok.encode_video(pad_frames(frames, 4), mode))
        assert tok.decode_video(codes, mode, num_frames=6).shape == (6, 16, 24, 3)
        with pytest.raises(InputError, match=r"num_frames must be in \[1, 8\]"):
            tok.decode_video(codes, mode, num_frames=9)


def test_single_frame_video_is_the_image(tok):
    frame = scene(16, 24, 9)
    assert torch.equal(tok.encode_video(frame[None], "causal")[0], tok.encode_images([frame])[0])


def test_bad_video_inputs(tok):
    with pytest.raises(InputError, match="unknown video mode"):
        tok.encode_video(video(4), "bidirectional")
    with pytest.raises(InputError, match="uint8"):
        tok.encode_video(video(4).astype(np.float32))
    with pytest.raises(InputError, match="multiples of 4"):
        tok.encode_video(video(4, 18, 24))
    with pytest.raises(InputError, match=r"codes must be in \[0, 64\)"):
        tok.decode_video(np.full((1, 2, 2), 99), "chunks")


def test_processor_must_match_the_model():
    with pytest.raises(InputError, match="spatial_factor 8 differs"):
        VisionTokenizer(small_vq(0), ImageProcessor(spatial_factor=8))


def test_save_and_load_keeps_processor(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    again = VisionTokenizer.from_pretrained(tmp_path / "tok")
    assert again.processor == tok.processor
    im = Image.fromarray(scene(30, 50))
    assert torch.equal(again.encode_image(im), tok.encode_image(im))


def test_every_vq_preset_has_a_matching_processor():
    from emu3.vq import VQ_PRESETS, vq_config

    assert set(PRESET_PROCESSORS) == set(VQ_PRESETS)
    for name, proc in PRESET_PROCESSORS.items():
        assert proc.spatial_factor == vq_config(name).spatial_factor
    with pytest.raises(InputError, match="unknown VQ preset"):
        VisionTokenizer.from_preset("huge")
