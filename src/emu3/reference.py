"""The reference implementations our parity tests and benchmarks compare against, built from our
weights: transformers' `LlamaForCausalLM` and `Emu3VQVAE`, and the official release's
prefix-constraint helper. Needs transformers (a test dependency; nothing else in emu3 imports this).
"""

from __future__ import annotations

import torch

from .checkpoint import hf_vq_shape, vq_config_to_hf, vq_key_map
from .model import Emu3LM
from .tokenizer import Vocabulary
from .vq import VisionVQ


def llama(model: Emu3LM, share: bool = False):
    """transformers' LlamaForCausalLM holding the same weights (Emu3's decoder is Llama), in eval mode.
    share=True: built without weights of its own and given our model's tensors (no second copy: an 8B on one
    card), its rotary tables made anew on the model's device."""
    import transformers

    c = model.config
    hf = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, tie_word_embeddings=False)
    device = next(model.parameters()).device
    if not share:
        ref = transformers.LlamaForCausalLM(hf)
        ref.load_state_dict(model.state_dict(), strict=True)
        return ref.eval().to(device)
    with torch.device("meta"):
        ref = transformers.LlamaForCausalLM(hf)
    ref.load_state_dict(model.state_dict(), strict=True, assign=True)
    with torch.device(device):  # not in the state dict: the rotary buffers, in fp32
        ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.model.rotary_emb.config)
    return ref.eval()


def emu3_vqvae(vq: VisionVQ):
    """transformers' Emu3VQVAE holding the same weights (renamed keys, Linear attention), in eval mode."""
    import transformers

    cfg = vq_config_to_hf(vq.config)
    cfg.pop("model_type")
    ref = transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig(**cfg))
    to_hf = vq_key_map(vq.config)
    state = {to_hf[k]: v.reshape(hf_vq_shape(to_hf[k], tuple(v.shape))) for k, v in vq.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    return ref.eval().to(vq.device)


def official_prefix_fn(vocab: Vocabulary, h: int, w: int):
    """Emu3PrefixConstrainedLogitsHelper (reference section 4.1), for transformers'
    PrefixConstrainedLogitsProcessor: offsets counted from the first <|image token|>."""
    visual = list(range(vocab.visual_offset, vocab.size))

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        ids = input_ids.tolist()
        offset = len(ids) - ids.index(vocab.img)
        if offset % (w + 1) == 0:
            return [vocab.eol]
        if offset == (w + 1) * h + 1:
            return [vocab.eof]
        if offset == (w + 1) * h + 2:
            return [vocab.eoi]
        if offset == (w + 1) * h + 3:
            return [vocab.eos]
        if offset > (w + 1) * h + 3:
            return [vocab.pad]
        return visual
    return allowed
