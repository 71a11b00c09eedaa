"""Vocabulary layout and the text tokenizer: three file formats, one tokenization."""

from __future__ import annotations

import base64
import json
import shutil
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu3.errors import CheckpointError, InputError
from emu3.tokenizer import PAT_STR, TextTokenizer, Vocabulary, token_bytes_to_string
from tests.conftest import released_tokenizer_dir

TEXTS = [
    "a red circle above two blue squares",
    "Hello (world)!\n\n  x  'S 90*90 naïve café — “quotes”",
    "ÅΩ≈ç√∫ 中文字符 😀 emoji\r\n\tend  ",
    "You are a helpful assistant. USER: what is it?. ASSISTANT:",
    "numbers 1234567890 and 3.14159, 16:9",
]


def write_released_layout(tok: TextTokenizer, folder):
    """Write a tokenizer as the release ships it: emu3.tiktoken + emu3_vision_tokens.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "emu3.tiktoken", "w") as f:
        for b, rank in sorted(tok.ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(b).decode()} {rank}\n")
    lines = ["<|image token|>", "<|image start|>", "<|image end|>",
             *(f"<|visual token {k:06d}|>" for k in range(tok.vocab.codebook_size))]
    (folder / "emu3_vision_tokens.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_released_layout_ids():
    v = Vocabulary()
    assert (v.pad, v.extra(0), v.eol, v.eof, v.extra(202), v.bos, v.eos) == (151643, 151646, 151846, 151847, 151848,
                                                                               151849, 151850)
    assert (v.img, v.boi, v.eoi, v.visual_offset, v.size) == (151851, 151852, 151853, 151854, 184622)
    assert v.visual(32767) == 184621 and v.code(151854) == 0
    assert (v.bov, v.vid, v.eov) == (151646, 151647, 151648)  # our video markers: unused extras 0-2
    names = v.special_tokens()
    assert len(names) == 211 + 32768 and min(names.values()) == 151643 and max(names.values()) == 184621
    for name in ("<|endoftext|>", "<|extra_200|>", "<|image token|>", "<|visual token 032767|>"):
        assert v.special_name(v.special_id(name)) == name


def test_small_vocabulary_has_the_same_structure():
    v = Vocabulary(text_size=1000, codebook_size=64)
    assert (v.pad, v.eol, v.eof, v.bos, v.eos, v.img, v.boi, v.eoi) == (1000, 1203, 1204, 1206, 1207, 1208, 1209,
                                                                         1210)
    assert v.visual_offset == 1211 and v.size == 1275
    with pytest.raises(InputError, match="at least 256"):
        Vocabulary(text_size=100)


@pytest.mark.parametrize("name, message", [
    ("<|extra_205|>", "extras are <|extra_0|> .. <|extra_204|>"),
    ("<|visual token 000064|>", r"visual tokens are <\|visual token 000000\|> .. <\|visual token 000063\|>"),
    ("<|visual token 12|>", "unknown special token"),
])
def test_unknown_specials_are_refused(small_tokenizer, name, message):
    with pytest.raises(InputError, match=message):
        small_tokenizer.encode(f"before {name} after")
    ids = small_tokenizer.encode(f"before {name} after", allow_special=False)  # plain text is always fine
    assert all(i < small_tokenizer.vocab.text_size for i in ids)


def test_specials_in_text_become_single_ids(small_tokenizer):
    v = small_tokenizer.vocab
    ids = small_tokenizer.encode("cat<|extra_203|><|image start|>1*1<|image token|><|visual token 000005|>")
    assert ids[-7] == v.bos and ids[-6] == v.boi and ids[-2] == v.img and ids[-1] == v.visual(5)  # meta: 1 * 1
    assert small_tokenizer.decode(ids) == "cat<|extra_203|><|image start|>1*1<|image token|><|visual token 000005|>"
    assert small_tokenizer.decode(ids, skip_special_tokens=True) == "cat1*1"
    with pytest.raises(InputError, match="outside the vocabulary"):
        small_tokenizer.decode([v.size])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_decode_inverts_encode(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text, allow_special=False)) == unicodedata.normalize("NFC",
                                                                                                              text)


def test_same_ids_from_released_files_and_tokenizer_json(small_tokenizer, tmp_path):
    small_tokenizer.save_pretrained(tmp_path / "json")
    released = TextTokenizer.from_pretrained(write_released_layout(small_tokenizer, tmp_path / "released"))
    from_json = TextTokenizer.from_pretrained(tmp_path / "json")
    assert released.vocab == from_json.vocab == small_tokenizer.vocab
    for text in TEXTS + ["a<|extra_204|>b<|visual token 000063|>"]:
        assert released.encode(text) == from_json.encode(text) == small_tokenizer.encode(text)


def test_our_tokenizer_json_is_read_the_same_by_hf_tokenizers(small_tokenizer, tmp_path):
    from tokenizers import Tokenizer

    small_tokenizer.save_pretrained(tmp_path / "json")
    hf = Tokenizer.from_file(str(tmp_path / "json" / "tokenizer.json"))
    for text in TEXTS + ["a<|extra_204|>b<|visual token 000063|>"]:
        assert hf.encode(text).ids == small_tokenizer.encode(text)


def test_transformers_converter_style_file(small_tokenizer, tmp_path):
    """An -hf tokenizer.json as transformers' converter writes it: GPT-2 pre-tokenizer, the specials in
    the BPE vocab as well, and an extra '<image>' placeholder. We read its ranks and tokenize with
    the released rules."""
    small_tokenizer.save_pretrained(tmp_path / "ours")
    data = json.loads((tmp_path / "ours" / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data["normalizer"] = None
    data["model"]["vocab"].update({t["content"]: t["id"] for t in data["added_tokens"]})
    data["added_tokens"].append({"id": small_tokenizer.vocab.size, "content": "<image>", "special": True,
                                 "single_word": False, "lstrip": False, "rstrip": False, "normalized": False})
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(data))
    hf_style = TextTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert hf_style.encode(text) == small_tokenizer.encode(text)


def test_bad_tokenizer_folders(small_tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        TextTokenizer.from_pretrained(tmp_path)
    folder = write_released_layout(small_tokenizer, tmp_path / "r")
    lines = (folder / "emu3_vision_tokens.txt").read_text().splitlines()
    (folder / "emu3_vision_tokens.txt").write_text("\n".join(lines[:10] + lines[11:]))
    message = r"line 11 is '<\|visual token 000008\|>', expected <\|visual token 000007"
    with pytest.raises(CheckpointError, match=message):
        TextTokenizer.from_pretrained(folder)
    (folder / "emu3_vision_tokens.txt").write_text("\n".join(lines[1:]))
    with pytest.raises(CheckpointError, match="must start with"):
        TextTokenizer.from_pretrained(folder)
    (folder / "emu3_vision_tokens.txt").unlink()
    with pytest.raises(CheckpointError, match="emu3_vision_tokens.txt: missing"):
        TextTokenizer.from_pretrained(folder)
    (folder / "emu3.tiktoken").write_text("not-base64!! 0\n")
    with pytest.raises(CheckpointError, match="line 1 is not '<base64> <rank>'"):
        TextTokenizer.from_pretrained(folder)
    small_tokenizer.save_pretrained(tmp_path / "j")
    data = json.loads((tmp_path / "j" / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        if t["content"] == "<|extra_203|>":
            t["id"] += 1
    (tmp_path / "j" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"not the Emu3 id layout: <\|extra_203\|> has id"):
        TextTokenizer.from_pretrained(tmp_path / "j")


def test_train_refuses_tiny_vocabularies():
    with pytest.raises(InputError, match=">= 256"):
        TextTokenizer.train(["abc"], 100, 64)


# ---- the real vocabulary (Qwen's BPE, shipped by BAAI as emu3.tiktoken) ----


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = released_tokenizer_dir(tmp_path_factory.mktemp("emu3-tokenizer"))
    return TextTokenizer.from_pretrained(folder), folder


def reference_encoding(folder):
    """The released Emu3Tokenizer's engine, spelled out from reference section 2: tiktoken over the
    ranks with Qwen's regex, and every special string (PAD, im_start/end, 205 extras, then the lines
    of emu3_vision_tokens.txt) numbered from 151643."""
    import tiktoken

    ranks = {}
    for line in (folder / "emu3.tiktoken").read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)),
             *(folder / "emu3_vision_tokens.txt").read_text().split("\n")[:-1]]
    specials = {n: 151643 + i for i, n in enumerate(names)}
    return tiktoken.Encoding("ref", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def test_real_vocabulary_matches_the_released_tokenizer(released):
    tok, folder = released
    assert tok.vocab == Vocabulary(151643, 32768) and len(tok) == 184622
    ref = reference_encoding(folder)
    texts = TEXTS + ["<|extra_203|>a dog<|image start|>90*90<|image token|><|visual token 000042|><|extra_200|>"]
    for text in texts:
        nfc = unicodedata.normalize("NFC", text)
        assert tok.encode(text) == ref.encode(nfc, allowed_special="all")
        assert tok.decode(tok.encode(text)) == nfc
    assert tok.encode("90*90") == [24, 15, 9, 24, 15]  # digits one by one: 5 tokens


@pytest.mark.slow
def test_real_vocabulary_tokenizer_json_round_trip(released, tmp_path):
    from tokenizers import Tokenizer

    tok, _ = released
    tok.save_pretrained(tmp_path / "json")  # merges rebuilt from ranks for all 151,643 tokens
    hf = Tokenizer.from_file(str(tmp_path / "json" / "tokenizer.json"))
    again = TextTokenizer.from_pretrained(tmp_path / "json")
    assert again.ranks == tok.ranks
    for text in TEXTS:
        assert hf.encode(text).ids == tok.encode(text) == again.encode(text)


def test_released_layout_copy_is_found(tmp_path):
    folder = released_tokenizer_dir(tmp_path)
    assert (folder / "emu3.tiktoken").stat().st_size == 2561218
    shutil.rmtree(folder)


def test_token_string_mapping_is_a_bijection():
    assert len({token_bytes_to_string(bytes([b])) for b in range(256)}) == 256
