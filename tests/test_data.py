"""Tokenized datasets and the training loader: tokenize, resume, tar input, packing, mixing, state."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from emu3.data.loader import Loader, MixPolicy, PairLoader
from emu3.data.shards import TokenDataset, read_index, write_index
from emu3.data.tokenize import Settings, summary, tokenize_dataset
from emu3.errors import InputError
from emu3.format import Formatter, Text, TokenType
from emu3.format import Image as ParsedImage
from tests.conftest import scene


def test_tokenize_counts_every_kind_and_every_skip(token_dataset):
    s = summary(read_index(token_dataset))
    assert s["kinds"] == {"image": 24, "video": 1, "qa": 1, "text": 1, "interleaved": 1, "preference": 2}
    assert s["skipped"] == {"no caption": 1, "not an image file that can be read": 1, "bad JSON line": 1}
    ds = TokenDataset(token_dataset)
    assert len(ds) == 30
    video = next(ds[i] for i in range(len(ds)) if ds[i].kind == "video")
    assert video.fields["codes"].shape == (2, 8, 8) and video.meta["frames"] == 8 and video.meta["fps"] == 8.0


def test_resume_redoes_only_missing_shards(dataset_inputs, tmp_path):
    args = ([dataset_inputs / "imgs", dataset_inputs / "more.jsonl"],)
    settings = Settings(str(dataset_inputs / "tok"), str(dataset_inputs / "vq"))
    out = tmp_path / "d"
    tokenize_dataset(*args, out, settings, shard_size=8, progress=False)
    before = TokenDataset(out)
    records = [before[i] for i in range(len(before))]
    index = read_index(out)
    names = [s["name"] for s in index["shards"]]
    mtime = (out / "shard-00000.tokens.npy").stat().st_mtime_ns
    # a kill after shard 2 was written but before the index named it, and shard 3 never written
    index["shards"] = [s for s in index["shards"] if s["name"] not in ("shard-00002", "shard-00003")]
    write_index(out, index)
    (out / "shard-00003.tokens.npy").unlink()
    tokenize_dataset(*args, out, settings, shard_size=8, progress=False)
    after = TokenDataset(out)
    assert [s["name"] for s in after.shards] == names  # every shard once
    assert (out / "shard-00000.tokens.npy").stat().st_mtime_ns == mtime  # finished shards kept
    for i, r in enumerate(records):
        got = after[i]
        assert got.kind == r.kind and all(np.array_equal(got.fields[k], v) for k, v in r.fields.items())
    with pytest.raises(InputError, match="was tokenized with vocabulary"):
        from emu3.tokenizer import TextTokenizer
        from tests.conftest import CORPUS

        TextTokenizer.train(CORPUS, 300, 64, min_frequency=1).save_pretrained(tmp_path / "other")
        tokenize_dataset(*args, out, Settings(str(tmp_path / "other"), str(dataset_inputs / "vq")), progress=False)


@pytest.mark.slow
def test_parallel_workers_give_the_same_records(dataset_inputs, token_dataset, tmp_path):
    out = tmp_path / "p"
    tokenize_dataset([dataset_inputs / "imgs", dataset_inputs / "more.jsonl"], out,
                     Settings(str(dataset_inputs / "tok"), str(dataset_inputs / "vq")), workers=2, shard_size=8,
                     progress=False)
    a, b = TokenDataset(token_dataset), TokenDataset(out)
    assert len(a) == len(b)
    for i in range(len(a)):
        assert all(np.array_equal(a[i].fields[k], b[i].fields[k]) for k in a[i].fields)


def test_webdataset_tar_input(dataset_inputs, tmp_path):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(scene(32, 32, i)).save(buf, format="PNG")
            for name, data in ((f"s{i}.png", buf.getvalue()), (f"s{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("s9.json")
        data = json.dumps({"text": "a text record"}).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    s = tokenize_dataset([tmp_path / "shard-0.tar"], tmp_path / "d",
                         Settings(str(dataset_inputs / "tok"), str(dataset_inputs / "vq")), progress=False)
    assert s["kinds"] == {"image": 3, "text": 1} and s["shards"] == 1


@pytest.fixture
def fmt(small_tokenizer):
    return Formatter(small_tokenizer)


def test_packing_keeps_documents_whole(token_dataset, fmt):
    loader = Loader([(str(token_dataset), 1.0)], fmt, seq_len=300, batch_size=4, seed=1)
    v = fmt.vocab
    for _ in range(5):
        b = loader.next_batch()
        for row in range(4):
            ids, docs, targets = b.input_ids[row].numpy(), b.document_ids[row].numpy(), b.targets[row].numpy()
            weights = b.weights[row].numpy()
            for d in np.unique(docs):
                span = np.flatnonzero(docs == d)
                seg = ids[span]
                if seg[0] == v.pad:
                    assert (seg == v.pad).all() and (targets[span] == -100).all()
                    continue
                assert seg[0] == v.bos and seg[-1] == v.eos  # whole documents only
                parsed = fmt.parse(seg)
                assert all(p.complete for p in parsed if isinstance(p, ParsedImage))
                t = targets[span]
                valid = t != -100
                assert np.array_equal(t[:-1][valid[:-1]], seg[1:][valid[:-1]])  # the next token of the same document
                assert t[-1] == -100  # never predict across documents
                vis = valid & np.isin(np.append(seg[1:], v.pad), np.arange(v.visual_offset, v.size))
                assert np.allclose(weights[span][vis], 0.5) and np.allclose(weights[span][valid & ~vis], 1.0)


def test_policy_caption_after_and_dropout(token_dataset, fmt):
    v = fmt.vocab
    i2t = Loader([(str(token_dataset), 1.0)], fmt, 300, 2, MixPolicy(caption_after=1.0), seed=0)
    t2i = Loader([(str(token_dataset), 1.0)], fmt, 300, 2, MixPolicy(drop_caption=1.0, caption_after=0.0), seed=0)
    for loader, check in ((i2t, "image first"), (t2i, "empty caption")):
        for _ in range(20):
            record = loader.datasets[0][loader.rng.integers(len(loader.datasets[0]))]
            if record.kind != "image":
                continue
            doc = loader.document(record)
            if check == "image first":
                assert doc.ids[1] == v.boi and doc.loss_mask[doc.types == TokenType.VISUAL].sum() == 0
            else:
                assert doc.ids[1] == v.boi and isinstance(fmt.parse(doc.ids)[0], ParsedImage)
    text_only = Loader([(str(token_dataset), 1.0)], fmt, 300, 2, seed=0)
    record = next(text_only.datasets[0][i] for i in range(30) if text_only.datasets[0][i].kind == "text")
    assert fmt.parse(text_only.document(record).ids) == [Text("plain text about shapes and colours")]


def test_extension_samples_are_given_half_or_a_random_share_of_the_frames(token_dataset, fmt):
    from emu3.data.shards import Record

    v = fmt.vocab
    clip = Record("video", {"caption": np.asarray(fmt.tok.encode("a red circle moves left"), np.int64),
                            "codes": np.arange(4 * 4 * 4).reshape(4, 4, 4) % v.codebook_size}, {"fps": 8.0})

    def given(policy):  # latent frames whose end of frame carries no loss, over 60 extension samples
        loader = Loader([(str(token_dataset), 1.0)], fmt, 400, 2, policy, seed=0)
        out = []
        for _ in range(60):
            doc = loader.document(clip)
            eof = doc.ids == v.eof
            assert eof.sum() == 4 and doc.loss_mask[-1]  # every frame there, EOS a target
            out.append(int((eof & ~doc.loss_mask).sum()))
        return out

    assert set(given(MixPolicy(video_extension=1.0))) == {2}  # the first half, as before
    assert set(given(MixPolicy(video_extension=1.0, extension_context="random"))) == {1, 2, 3}


def test_answer_weight_scales_only_qa_answers(token_dataset, fmt):
    """answer_weight multiplies the loss weight of a QA record's answer (and its EOS), nothing else; a QA
    document carried over to the next row keeps it through the loader's saved state."""
    loader = Loader([(str(token_dataset), 1.0)], fmt, 300, 2, MixPolicy(answer_weight=8.0), seed=0)
    qa = next(r for r in loader.datasets[0] if r.kind == "qa")
    doc = loader.document(qa)
    assert doc.weight == 8.0 and doc.loss_mask.sum() >= 2
    loader.pending = doc
    ids, targets, weights, docs = loader._row()
    span = docs == 0
    assert np.array_equal(ids[span], doc.ids)
    assert sorted(set(weights[span][targets[span] != -100].tolist())) == [8.0]
    assert weights[~span][targets[~span] != -100].max() <= 1.0  # the other documents keep their weights
    loader.pending = doc
    fresh = Loader([(str(token_dataset), 1.0)], fmt, 300, 2, MixPolicy(answer_weight=8.0), seed=0)
    fresh.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert fresh.pending.weight == 8.0


def test_qa_follow_ups_become_one_conversation_about_the_image(dataset_inputs, tmp_path, fmt):
    """A QA line with follow_ups is one record and one document: every turn's answer is a target."""
    imgs = dataset_inputs / "imgs"
    lines = [{"image": str(imgs / "03.png"), "question": "how many circles", "answer": "two",
              "follow_ups": [["what color is the circle", "red"], ["is it big", "no"]]},
             {"image": str(imgs / "04.png"), "question": "q", "answer": "a", "follow_ups": [["q2"]]},
             {"image": str(imgs / "05.png"), "question": "q", "answer": "a", "follow_ups": [["q2", "  "]]},
             {"image": str(imgs / "05.png"), "question": ["q"], "answer": "a"}]
    manifest = tmp_path / "follow_ups.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "d"
    tokenize_dataset([manifest], out, Settings(str(dataset_inputs / "tok"), str(dataset_inputs / "vq")),
                     progress=False)
    index = read_index(out)
    assert summary(index)["kinds"] == {"qa": 1}
    assert sorted(summary(index)["skipped"]) == ["a QA record's question must be a string",
                                                  "follow_ups[0] must be a [question, answer] pair with an answer"]
    assert summary(index)["skipped"]["follow_ups[0] must be a [question, answer] pair with an answer"] == 2  # blank too
    record = TokenDataset(out)[0]
    assert record.meta == {"turns": 3} and set(record.fields) == {"codes", "question", "answer", "q1", "a1", "q2", "a2"}
    doc = Loader([(str(out), 1.0)], fmt, 300, 1, seed=0).document(record)
    want = fmt.chat(record.fields["codes"], "how many circles", "two",
                    follow_ups=[("what color is the circle", "red"), ("is it big", "no")])
    assert np.array_equal(doc.ids, want.ids) and np.array_equal(doc.loss_mask, want.loss_mask)


def test_mixture_follows_the_weights(token_dataset, fmt):
    loader = Loader([(str(token_dataset), 3.0), (str(token_dataset), 1.0)], fmt, 200, 8, seed=3)
    for _ in range(20):
        loader.next_batch()
    a, b = loader.stats["per_source"]
    assert abs(a / (a + b) - 0.75) < 0.06


def test_state_round_trip_is_exact_across_epochs(token_dataset, fmt):
    loader = Loader([(str(token_dataset), 1.0)], fmt, 256, 4, seed=5)
    for _ in range(6):  # ~1.5 epochs of 30 records
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # survives JSON
    expected = [loader.next_batch() for _ in range(8)]
    fresh = Loader([(str(token_dataset), 1.0)], fmt, 256, 4, seed=5)
    fresh.load_state_dict(state)
    for want in expected:
        got = fresh.next_batch()
        for field in ("input_ids", "targets", "weights", "document_ids"):
            assert np.array_equal(getattr(got, field), getattr(want, field))
    assert fresh.cursors[0][0] >= 2  # crossed epoch boundaries


def test_ranks_take_slices_of_the_same_global_batch(token_dataset, fmt):
    one = Loader([(str(token_dataset), 1.0)], fmt, 256, 4, seed=7)
    ranks = [Loader([(str(token_dataset), 1.0)], fmt, 256, 2, seed=7, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        whole = one.next_batch().input_ids
        parts = [r.next_batch().input_ids for r in ranks]
        assert np.array_equal(np.concatenate(parts), whole)


def test_too_long_documents_and_bad_sources(token_dataset, fmt, small_tokenizer):
    loader = Loader([(str(token_dataset), 1.0)], fmt, 40, 2, seed=0)
    for _ in range(5):
        loader.next_batch()
    assert loader.stats["skipped_too_long"] > 0  # 8x8 images need 83 tokens: never split, skipped
    with pytest.raises(InputError, match="no training data"):
        Loader([], fmt, 64, 1)
    with pytest.raises(InputError, match="not a tokenized dataset"):
        Loader([("/nonexistent", 1.0)], fmt, 64, 1)
    with pytest.raises(InputError, match="weights must be positive"):
        Loader([(str(token_dataset), 0.0)], fmt, 64, 1)


def test_preference_pairs(token_dataset, fmt):
    pairs = PairLoader(str(token_dataset), fmt.vocab.pad, batch_size=2, seed=0)
    b = pairs.next_batch()
    for ids, mask in ((b.chosen, b.chosen_mask), (b.rejected, b.rejected_mask)):
        for row in range(2):
            predicted = ids[row][1:][mask[row][:-1]]
            assert predicted[-1] == fmt.vocab.eos and (predicted >= fmt.vocab.visual_offset).sum() >= 1
