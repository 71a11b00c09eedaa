"""Sequence builders and the parser: exact strings and ids, counts, masks, round trips, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu3.errors import InputError
from emu3.format import (
    NEGATIVE_PROMPT,
    POSITIVE_SUFFIX,
    STAGE1_TEMPLATE,
    Formatter,
    Image,
    ParseError,
    Text,
    TokenType,
    Video,
    generation_grid,
)
from emu3.orders import ORDERS
from emu3.tokenizer import TextTokenizer
from tests.conftest import released_tokenizer_dir


@pytest.fixture(scope="module")
def released_fmt(tmp_path_factory):
    return Formatter(TextTokenizer.from_pretrained(released_tokenizer_dir(tmp_path_factory.mktemp("tok"))))


@pytest.fixture
def fmt(small_tokenizer):
    return Formatter(small_tokenizer)


def grid(h, w, seed=0, k=64):
    return np.random.default_rng(seed).integers(0, k, (h, w))


def vis(codes):
    return "".join(f"<|visual token {c:06d}|>" for c in codes)


# ---- exact strings with the real vocabulary ----


def test_image_string_exactly_as_released(released_fmt):
    codes = np.array([[5, 6, 7], [32767, 0, 1]])
    ids, types = released_fmt.image(codes)
    text = released_fmt.tok.decode(ids)
    assert text == ("<|image start|>2*3<|image token|>" + vis([5, 6, 7]) + "<|extra_200|>" + vis([32767, 0, 1])
                    + "<|extra_200|><|extra_201|><|image end|>")
    assert ids.tolist() == released_fmt.tok.encode(text)  # the released string path gives the same ids
    assert ids.tolist() == [151852, 17, 9, 18, 151851, 151859, 151860, 151861, 151846, 184621, 151854, 151855, 151846,
                            151847, 151853]
    assert types.tolist() == [2] * 5 + [1, 1, 1, 2, 1, 1, 1, 2, 2, 2]


def test_image_token_count(released_fmt):
    for h, w in [(90, 90), (64, 64), (68, 120), (1, 1)]:
        ids, _ = released_fmt.image(np.zeros((h, w), int))
        meta = len(released_fmt.tok.encode(f"{h}*{w}"))
        assert len(ids) == 1 + meta + 1 + h * (w + 1) + 2
    assert len(released_fmt.image(np.zeros((90, 90), int))[0]) == 8199  # 1 + 5 ("90*90") + 1 + 90 * 91 + 2


def test_generation_prompts_as_released(released_fmt):
    tok = released_fmt.tok
    h, w = generation_grid("1:1", 518400)
    pos = released_fmt.generation_prompt("a portrait of young girl.", (h, w), suffix=POSITIVE_SUFFIX)
    assert tok.decode(pos) == ("<|extra_203|>a portrait of young girl. masterpiece, film grained, best quality."
                               "<|image start|>90*90<|image token|>")
    neg = released_fmt.negative_prompt((h, w), NEGATIVE_PROMPT)
    assert tok.decode(neg) == "<|extra_203|>" + NEGATIVE_PROMPT + "<|image start|>90*90<|image token|>"
    assert tok.decode(released_fmt.negative_prompt((64, 64))) == "<|extra_203|><|image start|>64*64<|image token|>"


def test_chat_prompt_as_released(released_fmt):
    codes = np.array([[1, 2]])
    prompt = released_fmt.chat_prompt(codes, "Describe the image")
    assert released_fmt.tok.decode(prompt) == (
        "<|extra_203|>You are a helpful assistant. USER: <|image start|>1*2<|image token|>" + vis([1, 2])
        + "<|extra_200|><|extra_201|><|image end|>Describe the image. ASSISTANT:")
    stage1 = released_fmt.chat_prompt(codes, "a photo of", template=STAGE1_TEMPLATE)
    assert released_fmt.tok.decode(stage1).endswith("<|image end|>a photo of")


@pytest.mark.parametrize("ratio, area, expected", [("1:1", 518400, (90, 90)), ("16:9", 518400, (68, 120)),
                                                    ("4:3", 518400, (78, 104)), ("1:1", 262144, (64, 64)),
                                                    (" 9 : 16 ", 518400, (120, 68))])
def test_generation_grid(ratio, area, expected):
    assert generation_grid(ratio, area) == expected


@pytest.mark.parametrize("ratio", ["16-9", "0:1", "", "a:b", "1:1:1"])
def test_generation_grid_bad_ratio(ratio):
    with pytest.raises(InputError, match="'W:H'"):
        generation_grid(ratio)


# ---- samples: masks and types ----


def test_t2i_sample_masks_and_caption_dropout(fmt):
    v = fmt.vocab
    codes = grid(3, 4)
    s = fmt.t2i("a red circle", codes)
    assert s.ids[0] == v.bos and s.ids[-1] == v.eos and s.ids[-2] == v.eoi
    assert not s.loss_mask[0] and s.loss_mask[1:].all()
    assert (s.types == TokenType.VISUAL).sum() == 12
    out = fmt.t2i("a red circle", codes, loss="output")
    img = int(np.flatnonzero(out.ids == v.img)[0])
    assert not out.loss_mask[:img + 1].any() and out.loss_mask[img + 1:].all()
    dropped = fmt.t2i("a red circle", codes, drop_caption=1.0, rng=np.random.default_rng(0))
    assert dropped.ids[1] == v.boi  # empty caption: the unconditional sample
    draws = [len(fmt.t2i("a red circle", codes, 0.5, np.random.default_rng(7))) for _ in range(2)]
    assert draws[0] == draws[1]  # same seed, same decision
    kept = sum(len(fmt.t2i("cat", codes, 0.3, rng)) > len(dropped) for rng in [np.random.default_rng(0)] for _ in
               range(200))
    assert 110 < kept < 170  # about 70% keep their caption
    with pytest.raises(InputError, match="needs an rng"):
        fmt.t2i("x", codes, drop_caption=0.1)
    with pytest.raises(InputError, match=r"must be in \[0, 1\]"):
        fmt.t2i("x", codes, drop_caption=1.5, rng=np.random.default_rng(0))


def test_i2t_and_chat_masks_cover_only_the_answer(fmt):
    v = fmt.vocab
    s = fmt.i2t(grid(2, 2), "two circles")
    answer = fmt.text("two circles")
    assert s.loss_mask.sum() == len(answer) + 1
    assert s.ids[s.loss_mask].tolist() == answer.tolist() + [v.eos]
    c = fmt.chat(grid(2, 2), "how many?", " Two.")
    assert c.ids[c.loss_mask].tolist() == fmt.text(" Two.").tolist() + [v.eos]
    with pytest.raises(InputError, match="non-empty caption"):
        fmt.i2t(grid(2, 2), "  ")
    with pytest.raises(InputError, match="non-empty answer"):
        fmt.chat(grid(2, 2), "q", "")


def test_chat_follow_ups_ask_more_about_the_same_image(fmt):
    v, img = fmt.vocab, grid(2, 2)
    one = fmt.chat(img, "how many circles are there", "two")
    more = fmt.chat(img, "how many circles are there", "two", follow_ups=[("what color is the square", "red"),
                                                                       ("is there a blue circle", "no")])
    n = len(one) - 1  # the first turn is the single-turn sample without its E
    assert more.ids[:n].tolist() == one.ids[:n].tolist() and more.loss_mask[:n].tolist() == one.loss_mask[:n].tolist()
    targets = [fmt.text(a).tolist() for a in ("two", "red", "no")]
    assert more.ids[more.loss_mask].tolist() == sum(targets, []) + [v.eos]
    assert fmt.tok.decode(more.ids[n:], skip_special_tokens=True) == (
        " USER: what color is the square. ASSISTANT:red USER: is there a blue circle. ASSISTANT:no")
    with pytest.raises(InputError, match=r"turn 2 has none"):
        fmt.chat(img, "q", "a", follow_ups=[("q2", " ")])


def test_video_layout_every_frame_is_an_image_string(fmt):
    v = fmt.vocab
    codes = np.stack([grid(2, 3, s) for s in range(3)])
    ids, types, starts = fmt.video(codes, fps=12)
    assert fmt.tok.decode(ids[:starts[0]]) == "<|extra_0|>3*2*3@12<|extra_1|>"
    assert ids[-1] == v.eov and len(starts) == 3
    ends = starts[1:] + [len(ids) - 1]
    for f, (a, b) in enumerate(zip(starts, ends)):
        frame_ids, _ = fmt.image(codes[f])
        assert np.array_equal(ids[a:b], frame_ids)
        (parsed,) = fmt.parse(ids[a:b])
        assert isinstance(parsed, Image) and np.array_equal(parsed.codes, codes[f])


def test_t2v_and_extension_masks(fmt):
    v = fmt.vocab
    codes = np.stack([grid(2, 2, s) for s in range(4)])
    t2v = fmt.t2v("a ball rolls", codes, fps=8)
    assert t2v.loss_mask[1:].all() and t2v.ids[-1] == v.eos and t2v.ids[-2] == v.eov
    ext = fmt.video_extension("a ball rolls", codes, context_frames=2, fps=8)
    targets = ext.ids[ext.loss_mask]
    assert (targets == v.boi).sum() == 2 and targets[-2:].tolist() == [v.eov, v.eos]
    assert np.array_equal(v.code(targets[np.vectorize(v.is_visual)(targets)]), codes[2:].reshape(-1))
    prompt = fmt.video_prompt("a ball rolls", (4, 2, 2), fps=8, context=codes[:2])
    assert np.array_equal(prompt, ext.ids[:len(prompt)])
    with pytest.raises(InputError, match="context_frames must be in"):
        fmt.video_extension("x", codes, context_frames=4)
    with pytest.raises(InputError, match="must match the grid"):
        fmt.video_prompt("x", (4, 3, 3), context=codes[:2])


def test_interleaved_and_preference_pairs(fmt):
    segs = ["step one", grid(2, 2, 1), "step two", grid(3, 2, 2)]
    s = fmt.interleaved(segs)
    parsed = fmt.parse(s.ids)
    assert [type(p).__name__ for p in parsed] == ["Text", "Image", "Text", "Image"]
    assert parsed[0].text == "step one" and np.array_equal(parsed[3].codes, segs[3])
    with pytest.raises(InputError, match="at most 8 images"):
        fmt.interleaved([grid(1, 1)] * 9)
    with pytest.raises(InputError, match="at least one segment"):
        fmt.interleaved([])
    prompt = fmt.generation_prompt("cat", (2, 2))
    chosen = fmt.image(grid(2, 2, 1))[0][len(fmt.image_header(2, 2)):]
    pair = fmt.preference_pair(prompt, np.append(chosen, fmt.vocab.eos), np.append(chosen[::-1], fmt.vocab.eos))
    assert pair.chosen[-1] == fmt.vocab.eos
    with pytest.raises(InputError, match="rejected is empty"):
        fmt.preference_pair(prompt, chosen, [])
    with pytest.raises(InputError, match="chosen has ids outside"):
        fmt.preference_pair(prompt, [fmt.vocab.size], chosen)


def test_bad_codes(fmt):
    with pytest.raises(InputError, match=r"in \[0, 64\)"):
        fmt.image(np.array([[0, 64]]))
    with pytest.raises(InputError, match=r"integer array \(h, w\)"):
        fmt.image(np.zeros((2, 2, 2), int))
    with pytest.raises(InputError, match="integer array"):
        fmt.image(np.zeros((2, 2)))


# ---- parser ----


@pytest.mark.parametrize("order", ORDERS)
def test_round_trip_every_kind_in_every_order(small_tokenizer, order):
    fmt = Formatter(small_tokenizer, order=order, block=2)
    img, vid = grid(5, 7, 3), np.stack([grid(3, 4, s) for s in range(3)])
    cases = [
        (fmt.t2i("a red circle", img).ids, [Text("a red circle"), img]),
        (fmt.i2t(img, "a red circle").ids, [img, Text("a red circle")]),
        (fmt.chat(img, "what?", " A circle.").ids, [Text("You are a helpful assistant. USER: "), img,
                                                     Text("what?. ASSISTANT: A circle.")]),
        (fmt.t2v("rolling", vid, fps=24).ids, [Text("rolling"), ("video", vid, 24.0)]),
        (fmt.interleaved(["a", img, "b", img]).ids, [Text("a"), img, Text("b"), img]),
    ]
    for ids, expected in cases:
        parsed = fmt.parse(ids)
        assert len(parsed) == len(expected)
        for got, want in zip(parsed, expected):
            if isinstance(want, Text):
                assert got == want
            elif isinstance(want, tuple):
                assert isinstance(got, Video) and got.complete and got.fps == want[2]
                assert np.array_equal(got.codes, want[1]) and got.known.all()
            else:
                assert isinstance(got, Image) and got.complete and np.array_equal(got.codes, want)


def test_parse_stops_at_eos_and_skips_pad(fmt):
    v = fmt.vocab
    ids = np.concatenate([fmt.t2i("cat", grid(2, 2)).ids, [v.pad, v.pad], fmt.text("after")])
    assert len(fmt.parse(ids)) == 2


@pytest.mark.parametrize("edit, message", [
    (lambda ids, v: ids[:-5], "truncated after"),
    (lambda ids, v: np.delete(ids, np.flatnonzero(ids == v.eol)[1] - 1), "row 1 has 3 visual tokens, expected 4"),
    (lambda ids, v: np.insert(ids, np.flatnonzero(ids == v.eol)[0], v.visual(1)), "more than 4 visual tokens"),
    (lambda ids, v: np.delete(ids, np.flatnonzero(ids == v.eof)), "unexpected <|image end|> inside a 3x4 image"),
    (lambda ids, v: np.delete(ids, np.flatnonzero(ids == v.eoi)), "not followed by the image end"),
    (lambda ids, v: np.insert(ids, np.flatnonzero(ids == v.eol)[0], v.bos), "unexpected <|extra_203|> inside"),
    (lambda ids, v: np.insert(ids, np.flatnonzero(ids == v.eol)[0], 5), "unexpected text id 5 inside"),
    (lambda ids, v: np.delete(ids, np.flatnonzero(ids == v.img)), "header"),
    (lambda ids, v: np.delete(ids, np.arange(-5, 0) + np.flatnonzero(ids == v.eof)[0]), "image ends after 2 rows of 3"),
])
def test_malformed_images(fmt, edit, message):
    ids = edit(fmt.t2i("cat", grid(3, 4)).ids, fmt.vocab)
    with pytest.raises(ParseError, match=message):
        fmt.parse(ids)
    segments = fmt.parse(ids, strict=False)  # best effort: flagged, never silently complete
    images = [s for s in segments if isinstance(s, Image)]
    assert images and not images[0].complete and message.split(" ")[0] in images[0].problem


def test_stray_markers_outside_images(fmt):
    v = fmt.vocab
    ids = np.concatenate([[v.bos], fmt.text("hi"), [v.eol], fmt.text("there")])
    with pytest.raises(ParseError, match=r"unexpected <\|extra_200\|> at position \d+ outside an image"):
        fmt.parse(ids)
    assert fmt.parse(ids, strict=False) == [Text("hithere")]


def test_malformed_video(fmt):
    vid = np.stack([grid(2, 2, s) for s in range(3)])
    ids = fmt.t2v("x", vid).ids
    with pytest.raises(ParseError, match="video truncated after 2 of 3 frames"):
        fmt.parse(ids[:np.flatnonzero(ids == fmt.vocab.boi)[2]])
    (_, video) = fmt.parse(ids[:np.flatnonzero(ids == fmt.vocab.boi)[2]], strict=False)
    assert not video.complete and video.known[:2].all() and not video.known[2].any()
    other = fmt.video(np.stack([grid(2, 2), grid(2, 2)]))[0]
    wrong_frame = np.concatenate([other[:-1][:np.flatnonzero(other == fmt.vocab.boi)[1]], fmt.image(grid(3, 2))[0],
                                  [fmt.vocab.eov]])
    with pytest.raises(ParseError, match="video frame 1 is 3x2, expected 2x2"):
        fmt.parse(wrong_frame)


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(min_value=1, max_value=60), order=st.sampled_from(ORDERS))
def test_any_truncation_is_flagged_and_consistent(small_tokenizer, cut, order):
    fmt = Formatter(small_tokenizer, order=order)
    codes = grid(4, 5, 9)
    ids = fmt.t2i("cat", codes).ids
    prefix = ids[:max(1, len(ids) - cut)]
    segments = fmt.parse(prefix, strict=False)
    images = [s for s in segments if isinstance(s, Image)]
    if images:
        (img,) = images
        assert img.codes.shape == (4, 5) or not img.complete
        if img.complete:
            assert np.array_equal(img.codes, codes)
        else:
            assert img.problem and np.array_equal(img.codes[img.known], codes[img.known])


def test_spiral_inpainting_prompt_keeps_exactly_the_border(small_tokenizer):
    from emu3.orders import border_tokens

    fmt = Formatter(small_tokenizer, order="spiral")
    codes = grid(6, 8, 4)
    n = border_tokens(6, 8, 2)
    prompt = fmt.partial_image_prompt("a cat", codes, n)
    full = fmt.t2i("a cat", codes).ids
    assert np.array_equal(prompt, full[:len(prompt)])  # a true prefix of the full sequence
    (_, image) = fmt.parse(prompt, strict=False)
    i, j = np.indices((6, 8))
    ring = np.minimum(np.minimum(i, j), np.minimum(5 - i, 7 - j))
    assert not image.complete and np.array_equal(image.known, ring < 2)
    assert np.array_equal(image.codes[image.known], codes[ring < 2])
    with pytest.raises(InputError, match=r"known_tokens must be in \[0, 48\]"):
        fmt.partial_image_prompt("a cat", codes, 49)
