"""The language model: parity with transformers, caches, packed documents, dropout, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from emu3.checkpoint import load_model, save_model
from emu3.errors import CheckpointError, InputError
from emu3.model import Emu3LM, KVCache, ModelConfig, model_config
from emu3.reference import llama
from emu3.tokenizer import Vocabulary

transformers = pytest.importorskip("transformers")
VOCAB = Vocabulary(300, 64)

CONFIGS = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1, rope_theta=10000.0, rms_norm_eps=1e-6),
    "wide": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=200,
                 num_hidden_layers=3),
}


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Emu3LM(model_config("tiny", VOCAB, attention_dropout=0.0, **overrides))
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.1)  # norms that matter
    return model.eval()


def left_padded_batch(seed=0, lengths=(17, 12, 5)):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(0, VOCAB.size, (len(lengths), t), generator=g)
    mask = torch.arange(t)[None] >= torch.tensor([t - n for n in lengths])[:, None]
    ids[~mask] = VOCAB.pad
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_llama_with_left_padding(name):
    model = random_model(1, **CONFIGS[name])
    ref = llama(model)
    ids, mask, positions = left_padded_batch(2)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
    ours = model(ids, positions=positions, key_mask=mask)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=1e-4)


def test_logits_equal_emu3_for_conditional_generation_both_ways(tmp_path, small_tokenizer):
    from tests.conftest import small_vq

    model = random_model(3)
    vq = small_vq(0)
    # ours -> transformers
    save_model(model, tmp_path / "ours-hf", layout="transformers", vq=vq, max_shard_bytes=100_000)
    ref, info = transformers.Emu3ForConditionalGeneration.from_pretrained(tmp_path / "ours-hf",
                                                                          output_loading_info=True)
    assert not any(info.values())
    ids, mask, positions = left_padded_batch(4)
    with torch.no_grad():
        theirs = ref.eval()(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
    torch.testing.assert_close(model(ids, positions=positions, key_mask=mask)[mask], theirs[mask], rtol=0, atol=1e-4)
    # transformers -> ours (its own save_pretrained, sharded)
    ref.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    assert (tmp_path / "theirs" / "model.safetensors.index.json").exists()
    again = load_model(tmp_path / "theirs")
    torch.testing.assert_close(again(ids, positions=positions, key_mask=mask)[mask], theirs[mask], rtol=0, atol=1e-4)


def test_cached_decoding_equals_the_full_forward():
    model = random_model(5)
    ids, mask, positions = left_padded_batch(6)
    full = model(ids, positions=positions, key_mask=mask)
    cache = KVCache(model.config, 3, 32)
    with torch.no_grad():
        chunks = [model.logits(model.hidden_states(ids[:, :6], positions=positions[:, :6], key_mask=mask[:, :6],
                                                   cache=cache))]
        chunks.append(model.logits(model.hidden_states(ids[:, 6:11], positions=positions[:, 6:11],
                                                       key_mask=mask[:, :11], cache=cache, start=6)))
        for t in range(11, 17):
            chunks.append(model.logits(model.hidden_states(ids[:, t:t + 1], positions=positions[:, t:t + 1],
                                                           key_mask=mask[:, :t + 1], cache=cache, start=t)))
    torch.testing.assert_close(torch.cat(chunks, 1)[mask], full[mask], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="does not fit the KV cache of 32"):
        model.hidden_states(ids, cache=cache, start=20)


def test_packed_documents_see_only_themselves():
    model = random_model(7)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 300, (1, n), generator=g) for n in (7, 5, 4))
    packed = torch.cat([a, b, c], 1)
    docs = torch.tensor([[0] * 7 + [1] * 5 + [2] * 4])
    out = model(packed, document_ids=docs)
    for doc, (lo, hi) in zip((a, b, c), ((0, 7), (7, 12), (12, 16))):
        torch.testing.assert_close(out[:, lo:hi], model(doc), rtol=0, atol=1e-5)


def test_dropout_in_the_four_released_places():
    model = Emu3LM(model_config("tiny", VOCAB, attention_dropout=0.3))
    model.init_weights(torch.Generator().manual_seed(0))
    assert model.model.dropout.p == 0.3  # embeddings
    layer = model.model.layers[0]
    assert layer.self_attn.dropout == 0.3 and layer.dropout.p == 0.3  # attention probs; attn and MLP outputs
    ids = torch.randint(0, 300, (2, 9))
    model.eval()
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))


def test_pad_row_gets_no_gradient_and_checkpointing_agrees():
    model = random_model(8)
    model.train()
    ids = torch.tensor([[VOCAB.pad, 5, 6, VOCAB.pad, 7]])
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    assert model.model.embed_tokens.weight.grad[VOCAB.pad].abs().sum() == 0
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    loss2 = model(ids).logsumexp(-1).mean()
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-6)


def test_8b_preset_size_and_cache_bytes():
    with torch.device("meta"):
        model = Emu3LM(model_config("emu3-8b"))
    n = sum(p.numel() for p in model.parameters())
    assert n == 8_492_011_520  # 6.98B in the blocks + 2 x 756M untied embedding / head (paper: 8.49B)
    assert len(model.state_dict()) == 291
    assert KVCache.bytes_per_token(model.config, torch.bfloat16) == 2 * 32 * 8 * 128 * 2  # 128 KiB


def test_config_validation():
    with pytest.raises(InputError, match="not divisible"):
        model_config("tiny", VOCAB, hidden_size=65)
    with pytest.raises(InputError, match="key-value heads"):
        model_config("tiny", VOCAB, num_key_value_heads=3)
    with pytest.raises(InputError, match="rope_scaling"):
        model_config("tiny", VOCAB, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(InputError, match="unknown model config fields: bogus"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "bogus": 1})
    with pytest.raises(InputError, match="do not follow the Emu3 layout"):
        ModelConfig(eol_token_id=151845).vocabulary()
    assert ModelConfig().vocabulary() == Vocabulary()


def test_released_layout_round_trip_and_strictness(tmp_path):
    model = random_model(9)
    save_model(model, tmp_path / "m", max_shard_bytes=60_000)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "Emu3" and cfg["architectures"] == ["Emu3ForCausalLM"]
    assert len(list((tmp_path / "m").glob("model-*-of-*.safetensors"))) > 1
    again = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert again.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (1, 6))
    torch.testing.assert_close(load_model(tmp_path / "m")(ids), model(ids), rtol=0, atol=0)
    shard = sorted((tmp_path / "m").glob("model-00001-*.safetensors"))[0]
    state = load_file(shard)
    key = sorted(state)[0]
    state[key] = state[key][..., :-1].contiguous()
    save_file(state, str(shard))
    with pytest.raises(CheckpointError, match=f"1 misshaped \\({key}"):
        load_model(tmp_path / "m")


def test_not_a_language_model_folder(tmp_path):
    from emu3.checkpoint import save_vq
    from tests.conftest import small_vq

    save_vq(small_vq(0), tmp_path / "vq")
    with pytest.raises(CheckpointError, match="not an Emu3 language model config"):
        load_model(tmp_path / "vq")


def test_hf_folder_with_in_memory_key_names(tmp_path):
    """Some -hf folders were written with transformers' in-memory names (model.text_model.*, lm_head,
    model.vqmodel.*): both the LM and the VQ load from them."""
    from emu3.checkpoint import load_vq
    from tests.conftest import small_vq

    model, vq = random_model(10), small_vq(1)
    save_model(model, tmp_path / "hf", layout="transformers", vq=vq)
    state = load_file(tmp_path / "hf" / "model.safetensors")
    renamed = {}
    for k, t in state.items():
        if k.startswith("text_model.lm_head."):
            k = "lm_head." + k[len("text_model.lm_head."):]
        elif k.startswith("text_model.model."):
            k = "model.text_model." + k[len("text_model.model."):]
        elif k.startswith("vqmodel."):
            k = "model." + k
        renamed[k] = t
    save_file(renamed, str(tmp_path / "hf" / "model.safetensors"))
    ids = torch.randint(0, 300, (1, 7))
    torch.testing.assert_close(load_model(tmp_path / "hf")(ids), model(ids), rtol=0, atol=0)
    assert torch.equal(load_vq(tmp_path / "hf").quantize.embedding.weight, vq.quantize.embedding.weight)


def test_chunked_loss_equals_one_chunk_with_gradients():
    model = random_model(11)
    model.train()
    ids = torch.randint(0, 300, (2, 24))
    labels = torch.randint(0, 300, (2, 24))
    labels[0, :5] = -100
    weights = torch.rand(2, 24)
    results = []
    for chunk in (None, 5):  # one chunk, and chunks recomputed in backward
        model.zero_grad()
        loss = model(ids, labels=labels, label_weights=weights, loss_chunk=chunk)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    per_token = model(ids, labels=labels, reduction="none")
    assert per_token.shape == (2, 24) and (per_token[0, :5] == 0).all()
    # the slow twin: full logits at every position, then the masked, weighted cross-entropy
    model.zero_grad()
    logits = model(ids)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                           reduction="none").view(2, 24)
    (ce * weights).sum().backward()
    torch.testing.assert_close((ce * weights).sum().detach(), results[0][0], rtol=1e-6, atol=1e-5)
    for p, g in zip(model.parameters(), results[0][1]):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_loss_without_any_label_still_reaches_the_head():
    model = random_model(12)
    model.train()
    ids = torch.randint(0, 300, (1, 6))
    loss = model(ids, labels=torch.full_like(ids, -100))
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad is not None
