"""Image processor (released smart_resize semantics), safe reading of images and videos, writing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from emu3 import media
from emu3.errors import InputError
from emu3.media import ImageProcessor, smart_resize, to_pixels, to_uint8
from tests.conftest import counter_frames, frame_index, scene, write_video_file

# (height, width) -> target, computed with the released function (BAAI/Emu3,
# emu3/tokenizer/image_processing_emu3visionvq.py) at its defaults: factor 8, 512^2..1024^2 pixels.
# Note: reference section 1.8 says 1920x1080 -> 760x1360; the released code returns 768x1360
# (1080 / 1.40625 = 768 exactly), and we follow the code.
SMART_RESIZE_TABLE = [
    ((720, 720), (720, 720)),
    ((1080, 1920), (768, 1360)),
    ((1920, 1080), (1360, 768)),
    ((3000, 4000), (880, 1176)),
    ((100, 100), (512, 512)),
    ((20, 44), (352, 760)),
    ((530, 777), (528, 776)),
    ((300, 200), (632, 424)),
]


@pytest.mark.parametrize("hw, target", SMART_RESIZE_TABLE)
def test_smart_resize_table(hw, target):
    assert smart_resize(*hw) == target


def test_smart_resize_rounds_half_to_even():
    # 20/8 = 2.5 -> 2 and 44/8 = 5.5 -> 6 (banker's rounding), not 3 and 6
    assert smart_resize(20, 44, min_pixels=1, max_pixels=10**9) == (16, 48)
    assert smart_resize(28, 60, min_pixels=1, max_pixels=10**9) == (32, 64)


def test_smart_resize_errors_name_the_limit():
    with pytest.raises(InputError, match="too small: 7x100 pixels, each side must be at least 8"):
        smart_resize(100, 7)
    with pytest.raises(InputError, match="aspect ratio 6.00 .* limit of 5"):
        smart_resize(100, 600)
    assert smart_resize(100, 500)  # exactly 5 is allowed


def test_preprocess_matches_transformers_processor():
    transformers = pytest.importorskip("transformers")
    ref = transformers.Emu3ImageProcessor(min_pixels=512 * 512, max_pixels=1024 * 1024, spatial_factor=8,
                                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for (h, w), _ in SMART_RESIZE_TABLE[:2] + SMART_RESIZE_TABLE[-2:]:
        img = Image.fromarray(scene(h, w, seed=h))
        expected = ref(img, return_tensors="pt")["pixel_values"]
        assert torch.equal(ImageProcessor().preprocess(img), expected)


def test_preprocess_batch_uses_first_image_size_and_range():
    a, b = Image.fromarray(scene(512, 512)), Image.fromarray(scene(300, 700))
    x = ImageProcessor().preprocess([a, b])
    assert x.shape == (2, 3, 512, 512) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_postprocess_is_an_exact_inverse():
    every_level = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    assert np.array_equal(to_uint8(to_pixels(every_level)), every_level)
    # rounds to nearest (the release truncates 254.9 to 254); values outside [-1, 1] clip
    x = torch.tensor([254.9 / 255 * 2 - 1, 0.4 / 255 * 2 - 1, -1.5, 1.5]).view(4, 1, 1)
    assert to_uint8(x).ravel().tolist() == [255, 0, 0, 255]


def test_to_rgb_composites_transparency_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2, :, :] = [255, 0, 0, 255]  # top half opaque red, bottom half transparent
    rgb = np.asarray(media.to_rgb(Image.fromarray(rgba, "RGBA")))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[3, 3].tolist() == [255, 255, 255]
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(media.to_rgb(grey16))[0, 0].tolist() == [255, 255, 255]


# ---- image files ----


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG header that declares a huge image (a decompression bomb shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 49)) + chunk(b"IEND", b"")


def test_open_image_reads_formats_and_applies_exif(tmp_path):
    arr = scene(20, 30)
    for ext in (".png", ".jpg", ".webp", ".bmp"):
        Image.fromarray(arr).save(tmp_path / f"a{ext}")
        im = media.open_image(tmp_path / f"a{ext}")
        assert im.mode == "RGB" and im.size == (30, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif)
    assert media.open_image(tmp_path / "rot.jpg").size == (20, 30)


def test_open_image_bad_inputs(tmp_path):
    (tmp_path / "text.png").write_text("definitely not an image")
    with pytest.raises(InputError, match="not an image file that can be read"):
        media.open_image(tmp_path / "text.png")
    Image.fromarray(scene(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        media.open_image(tmp_path / "cut.png")
    (tmp_path / "bomb.png").write_bytes(png_declaring(20000, 20000))
    with pytest.raises(InputError, match="larger than the limit of 67108864 pixels"):
        media.open_image(tmp_path / "bomb.png")
    (tmp_path / "big.png").write_bytes(png_declaring(9000, 9000))
    with pytest.raises(InputError, match="declares 9000x9000 = 81000000 pixels, more than the limit of 67108864"):
        media.open_image(tmp_path / "big.png")
    with pytest.raises(InputError, match="no such file"):
        media.open_image(tmp_path / "missing.png")


def test_probe(tmp_path):
    Image.fromarray(scene(16, 16)).save(tmp_path / "a.png")
    write_video_file(tmp_path / "a.gif", counter_frames(3), 10)
    write_video_file(tmp_path / "a.mp4", counter_frames(3), 10)
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01" * 50)
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert media.probe(tmp_path / "a.png") == "image"
    assert media.probe(tmp_path / "bad.png") == "image"  # so that open_image explains
    assert media.probe(tmp_path / "a.gif") == "video"
    assert media.probe(tmp_path / "a.mp4") == "video"
    assert media.probe(tmp_path) == "video"
    with pytest.raises(InputError, match="neither an image nor a video"):
        media.probe(tmp_path / "junk.bin")


# ---- video files ----


@pytest.mark.parametrize("ext, fps", [(".mp4", 30), (".webm", 30), (".gif", 10)])
def test_read_video_sampling(tmp_path, ext, fps):
    path = write_video_file(tmp_path / f"c{ext}", counter_frames(30), fps)
    v = media.read_video(path)
    assert v.fps == fps and [frame_index(f) for f in v.frames] == list(range(30))
    step = fps // 5
    assert [frame_index(f) for f in media.read_video(path, fps=5).frames] == list(range(0, 30, step))
    up = media.read_video(path, fps=2 * fps, start=0.5, max_frames=6)
    first = fps // 2
    assert [frame_index(f) for f in up.frames] == [first, first, first + 1, first + 1, first + 2, first + 2]
    assert len(media.read_video(path, duration=1.0).frames) == fps
    with pytest.raises(InputError, match="more than 10 frames .limit."):
        media.read_video(path, frame_limit=10)


def test_read_video_resizes_as_it_decodes(tmp_path):
    path = write_video_file(tmp_path / "c.mp4", np.repeat(scene(48, 80)[None], 5, 0), 25)
    proc = ImageProcessor(16 * 16, 32 * 32, 8)
    v = media.read_video(path, resize=proc.target_size)
    assert v.frames.shape == (5, *proc.target_size(48, 80), 3) and v.source_size == (48, 80)


def test_read_frame_folder_natural_order(tmp_path):
    frames = counter_frames(12)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"frame_{i + 1}.png")  # frame_10 sorts after frame_9
    v = media.read_video(tmp_path, fps=6)
    assert v.fps == 6 and [frame_index(f) for f in v.frames] == list(range(12))
    assert [frame_index(f) for f in media.read_video(tmp_path, fps=6, start=1.0).frames] == list(range(6, 12))
    Image.fromarray(scene(16, 16)).save(tmp_path / "frame_13.png")
    with pytest.raises(InputError, match="differs from the first frame"):
        media.read_video(tmp_path, fps=6)


def test_read_video_bad_inputs(tmp_path):
    good = write_video_file(tmp_path / "c.mp4", counter_frames(30), 30)
    (tmp_path / "junk.mp4").write_bytes(b"hello" * 100)
    with pytest.raises(InputError, match="not a video file that can be read"):
        media.read_video(tmp_path / "junk.mp4")
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.mp4"):
        media.read_video(tmp_path / "cut.mp4")
    webm = write_video_file(tmp_path / "c.webm", counter_frames(30), 30).read_bytes()
    (tmp_path / "cut.webm").write_bytes(webm[: len(webm) // 2])
    with pytest.raises(InputError, match="looks truncated"):
        media.read_video(tmp_path / "cut.webm")
    with pytest.raises(InputError, match="declares 32x32 = 1024 pixels per frame, more than the limit of 100"):
        media.read_video(good, max_pixels=100)
    with pytest.raises(InputError, match="fps must be a positive number"):
        media.read_video(good, fps=float("nan"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no image files"):
        media.read_video(tmp_path / "empty")


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".gif"])
def test_write_video_round_trip(tmp_path, ext):
    frames = np.stack([scene(32, 48, seed=i) for i in range(6)])
    media.write_video(tmp_path / f"out{ext}", frames, fps=12)
    back = media.read_video(tmp_path / f"out{ext}")
    assert back.frames.shape == frames.shape
    assert abs(back.fps - 12) < 0.7  # gif stores delays in 1/100 s
    err = np.abs(back.frames.astype(int) - frames.astype(int)).mean()
    assert err < 12, err


def test_write_refuses_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="unsupported video format"):
        media.write_video(tmp_path / "out.avi", counter_frames(2), 10)
    with pytest.raises(InputError, match="cannot write a video to '.png'"):
        media.check_output_suffix(tmp_path / "out.png", "video")
