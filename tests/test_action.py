"""FAST action tokens: the DCT, the error bound, compression, total decoding, files."""

from __future__ import annotations

import numpy as np
import pytest

from emu3.action import ActionIds, FASTTokenizer, dct_matrix
from emu3.errors import InputError


def smooth_chunks(n: int, t: int = 10, d: int = 3, seed: int = 0) -> np.ndarray:
    """Trajectory-like chunks: a few low frequencies plus a little noise, inside [-1, 1]."""
    rng = np.random.default_rng(seed)
    time = np.linspace(0, 1, t)[None, :, None]
    x = sum(rng.uniform(-0.3, 0.3, (n, 1, d)) * np.cos(np.pi * f * time + rng.uniform(0, 6, (n, 1, d)))
            for f in range(3))
    return np.clip(x + rng.normal(0, 0.01, (n, t, d)), -1, 1)


@pytest.fixture(scope="module")
def fast():
    return FASTTokenizer.fit(smooth_chunks(2000), scale=10, vocab_size=256)


def test_dct_is_scipys_orthonormal_dct2():
    fft = pytest.importorskip("scipy.fft")
    x = np.random.default_rng(0).normal(size=(7, 3))
    np.testing.assert_allclose(dct_matrix(7) @ x, fft.dct(x, type=2, norm="ortho", axis=0), atol=1e-12)
    np.testing.assert_allclose(dct_matrix(7).T @ (dct_matrix(7) @ x), x, atol=1e-12)


def test_round_trip_within_the_quantisation_bound_and_compresses(fast):
    held_out = smooth_chunks(300, seed=1)
    ids = fast.encode_batch(held_out)
    diff = np.stack([fast.decode(i) - x for i, x in zip(ids, held_out)])
    assert np.abs(diff).max() <= fast.max_error
    # rounding noise is uniform in +-0.5/scale per coefficient and the DCT is orthonormal: RMS 0.029
    assert np.sqrt((diff ** 2).mean()) < 0.5 / 10 / np.sqrt(3) * 1.1
    assert all(0 <= t < 256 for seq in ids for t in seq)
    assert np.mean([len(s) for s in ids]) < 0.5 * 10 * 3  # far fewer tokens than one per action value
    assert fast.encode(held_out[0]) == ids[0]


def test_decoding_is_total(fast):
    chunk = smooth_chunks(1, seed=2)[0]
    ids = fast.encode(chunk)
    assert np.array_equal(fast.decode([]), np.zeros((10, 3)))
    assert np.array_equal(fast.decode([-1, 10**9]), np.zeros((10, 3)))  # unknown ids are dropped
    for cut in range(len(ids)):  # a model that stops early still yields a (T, D) chunk
        out = fast.decode(ids[:cut])
        assert out.shape == (10, 3) and np.isfinite(out).all()
    np.testing.assert_allclose(fast.decode(ids + ids), fast.decode(ids))  # extra symbols are cut


def test_bad_input_is_refused(fast):
    with pytest.raises(InputError, match=r"must be \(10, 3\)"):
        fast.encode(np.zeros((9, 3)))
    with pytest.raises(InputError, match="NaN"):
        fast.encode(np.full((10, 3), np.nan))
    with pytest.raises(InputError, match="span .* but vocab_size is 16"):
        FASTTokenizer.fit(smooth_chunks(50) * 5, scale=50, vocab_size=16)
    with pytest.raises(InputError, match=r"\(N, T, D\)"):
        FASTTokenizer.fit(np.zeros((10, 3)))


def test_files_round_trip(fast, tmp_path):
    fast.save_pretrained(tmp_path)
    again = FASTTokenizer.from_pretrained(tmp_path)
    chunks = smooth_chunks(20, seed=3)
    assert again.encode_batch(chunks) == fast.encode_batch(chunks) and again.config == fast.config
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="expected 'emu3-fast-action-tokenizer'"):
        FASTTokenizer.from_pretrained(tmp_path / "bad.json")
    with pytest.raises(InputError, match="no FAST action tokenizer"):
        FASTTokenizer.from_pretrained(tmp_path / "nowhere")


def test_action_ids_take_the_last_text_ids():
    released = ActionIds(151643)  # Emu3's BPE: actions become ids 150,619..151,642
    assert released.lm_range == range(150619, 151643)
    assert released.to_lm([0, 1023]).tolist() == [150619, 151642]
    assert released.from_lm([5, 150619, 151642, 151643, 184000]).tolist() == [0, 1023]  # others dropped
    with pytest.raises(InputError, match=r"must be in \[0, 1024\)"):
        released.to_lm([1024])
    with pytest.raises(InputError, match="do not fit in a text vocabulary of 768"):
        ActionIds(768, 1024)
    assert ActionIds(768, 256).lm_range == range(512, 768)


def test_vla_sequences(small_tokenizer):
    """Training layout, loss and types; the prompt is the training sequence's prefix; chunks end at
    the next BOI or E; instructions may not use action ids."""
    from emu3.format import Formatter, TokenType

    f, v = Formatter(small_tokenizer), small_tokenizer.vocab
    instruction = "push the red square to the left"
    used = int(f.text(instruction).max())
    acts = ActionIds(v.text_size, min(64, v.text_size - 1 - used))
    rng = np.random.default_rng(0)
    views = lambda: [rng.integers(0, 64, (2, 3)), rng.integers(0, 64, (1, 2))]  # noqa: E731  table, wrist
    frames = [(views(), [3, 0, 7]), (views(), [1])]
    s = f.vla(instruction, frames, acts)
    ids = s.ids.tolist()
    assert ids[0] == v.bos and ids[-1] == v.eos
    in_actions = np.isin(s.ids, np.asarray(acts.lm_range))
    assert acts.from_lm(s.ids).tolist() == [3, 0, 7, 1] and s.loss_mask[in_actions].all()
    assert (s.types[in_actions] == TokenType.TEXT).all()
    n_instr = 1 + len(f.text(instruction))
    assert not s.loss_mask[:n_instr].any() and s.loss_mask[n_instr:].all()
    assert (s.types == TokenType.VISUAL).sum() == 2 * (6 + 2)
    after = [ids[i + 1] for i in np.flatnonzero(in_actions) if not in_actions[i + 1]]
    assert after == [v.boi, v.eos]  # what ends a chunk
    prompt = f.vla_prompt(instruction, frames[:1], frames[1][0], acts)
    assert ids[:len(prompt)] == prompt.tolist() and ids[len(prompt)] == acts.to_lm([1])[0]
    with pytest.raises(InputError, match="reserved for action tokens"):
        f.vla(instruction, frames, ActionIds(v.text_size, v.text_size - used))
    with pytest.raises(InputError, match="at least one token"):
        f.vla(instruction, [(views(), [])], acts)


def test_text_tokenizer_can_reserve_the_action_ids(tmp_path):
    """Our own VLA models keep the last text ids for actions only: no text encodes to them."""
    from emu3.tokenizer import TextTokenizer

    corpus = ["push the red square to the left", "put the circle on the blue target", "naïve café ∑ 🤖"] * 20
    tok = TextTokenizer.train(corpus, 300, 64, min_frequency=1, reserved=1024)
    acts = ActionIds(tok.vocab.text_size, 1024)
    plain = TextTokenizer.train(corpus, 300, 64, min_frequency=1)
    assert tok.vocab.text_size == plain.vocab.text_size + 1024 and acts.start == plain.vocab.text_size
    texts = corpus + ["\xff\ufffd odd bytes \U0010ffff", "".join(chr(c) for c in range(32, 3000))]
    for t in texts:
        ids = tok.encode(t, allow_special=False)
        assert ids == plain.encode(t, allow_special=False) and max(ids) < acts.start
    tok.save_pretrained(tmp_path)
    again = TextTokenizer.from_pretrained(tmp_path)
    assert again.vocab.text_size == tok.vocab.text_size and again.encode(texts[-1]) == tok.encode(texts[-1])
