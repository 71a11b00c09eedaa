"""The Emu3 language model: a Llama-style decoder over one vocabulary of text, control and visual ids.

Released details (reference section 3), where it differs from a textbook Llama:
- Dropout with p = config.attention_dropout (0.1 released) in four places while training: on the
  token embeddings, on the attention probabilities, and on the attention and MLP outputs before
  each residual add. Inference is unaffected.
- `padding_idx` = PAD in the embedding (its row gets no gradient), untied `lm_head`, logits in fp32.
- RMSNorm computes its variance in fp32; RoPE is the non-interleaved "rotate_half" form with
  theta from the config (1e6 released), cos/sin computed in fp32 and cast to the activations.
- No biases, no QK-norm; GQA (32 query / 8 key-value heads at 8B); SwiGLU MLP.

Masks. `forward` takes any of: nothing (plain causal), `key_mask` (B, S) marking real tokens (left
padding; with a KV cache it covers the cached positions too), `document_ids` (B, T) for packed
training sequences (block-diagonal causal: a token sees only earlier tokens of its own document;
positions restart per document, see `positions_for_documents`). Every token may attend to itself,
so padded rows stay finite and never poison real rows.

State-dict keys are Hugging Face Llama's (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.
q_proj.weight`, ..., `lm_head.weight`): the released Emu3-Gen/-Chat/-Stage1 shards load as is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import InputError
from .tokenizer import Vocabulary


@dataclass
class ModelConfig:
    """Fields of the released `Emu3Config` (config.json of Emu3-Gen / -Chat / -Stage1)."""

    vocab_size: int = 184622
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 9216
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int = 151643
    bos_token_id: int = 151849
    eos_token_id: int = 151850
    img_token_id: int = 151851
    boi_token_id: int = 151852
    eoi_token_id: int = 151853
    eol_token_id: int = 151846
    eof_token_id: int = 151847
    image_area: int = 518400
    tie_word_embeddings: bool = False
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (Emu3 uses silu)")
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings=True is not supported (Emu3's lm_head is untied)")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"{self.num_attention_heads} query heads are not a multiple of "
                            f"{self.num_key_value_heads} key-value heads")
        if self.rope_scaling is not None and self.rope_scaling.get("type", self.rope_scaling.get("rope_type")) not in (
                "linear", "default"):
            problems.append(f"rope_scaling {self.rope_scaling} is not supported (None or linear)")
        if not 0.0 <= self.attention_dropout < 1.0:
            problems.append(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        ids = [self.pad_token_id, self.bos_token_id, self.eos_token_id, self.img_token_id, self.boi_token_id,
               self.eoi_token_id, self.eol_token_id, self.eof_token_id]
        if max(ids) >= self.vocab_size:
            problems.append(f"special token ids {ids} must be below vocab_size {self.vocab_size}")
        if problems:
            raise InputError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_factor(self) -> float:
        if self.rope_scaling and self.rope_scaling.get("type", self.rope_scaling.get("rope_type")) == "linear":
            return float(self.rope_scaling["factor"])
        return 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = {"architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "model_type",
                   "use_cache", "pretraining_tp", "_name_or_path", "name_or_path", "mlp_bias", "attention_bias"}
        unknown = sorted(k for k in d if k not in names and k not in ignored)
        if unknown:
            raise InputError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def vocabulary(self) -> Vocabulary:
        """The id layout implied by this config (checked against the special token ids)."""
        vocab = Vocabulary(self.pad_token_id, self.vocab_size - self.pad_token_id - 211)
        got = (self.bos_token_id, self.eos_token_id, self.img_token_id, self.boi_token_id, self.eoi_token_id,
               self.eol_token_id, self.eof_token_id)
        want = (vocab.bos, vocab.eos, vocab.img, vocab.boi, vocab.eoi, vocab.eol, vocab.eof)
        if got != want:
            raise InputError(f"model config token ids {got} do not follow the Emu3 layout {want}")
        return vocab


# Named sizes: overrides of the released 8B configuration.
MODEL_PRESETS: dict[str, dict] = {
    "emu3-8b": {},
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096),
    # The built-in model (about 10M parameters with its 2k-id vocabulary; 20 MB in 16-bit floats).
    "demo": dict(hidden_size=320, intermediate_size=864, num_hidden_layers=8, num_attention_heads=5,
                 num_key_value_heads=1, max_position_embeddings=1024, image_area=64 * 64),
}


def model_config(name: str = "emu3-8b", vocab: Vocabulary | None = None, **overrides) -> ModelConfig:
    """A preset, with the vocabulary's size and token ids (default: the released layout)."""
    if name not in MODEL_PRESETS:
        raise InputError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    vocab = vocab or Vocabulary()
    ids = dict(vocab_size=vocab.size, pad_token_id=vocab.pad, bos_token_id=vocab.bos, eos_token_id=vocab.eos,
               img_token_id=vocab.img, boi_token_id=vocab.boi, eoi_token_id=vocab.eoi, eol_token_id=vocab.eol,
               eof_token_id=vocab.eof)
    return ModelConfig(**{**ids, **MODEL_PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float, factor: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T); computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = (positions.float() / factor)[..., None] * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class KVCache:
    """Preallocated keys and values for every layer: (layers, B, kv_heads, max_len, head_dim) each.

    Either all rows share one write position (`Engine`: left padding lines prompts up at the end), so a
    step writes columns [start, start + T) of every row; or each row writes its one new token at its
    own column (`start` a (B,) tensor: continuous batching, `emu3.batching`).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) that shares this one's memory (writes go through)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, start:stop], self.v[:, start:stop], self.max_len
        return view

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` columns of row `src` into row `dst`."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes one token occupies in one row (keys and values of every layer)."""
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.dropout = cfg.attention_dropout

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int | torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            if isinstance(start, torch.Tensor):  # row b's tokens at its own columns start[b] + i (or start[b, i])
                rows = torch.arange(b, device=x.device)[:, None]  # (B, 1)
                cols = start if start.dim() == 2 else start[:, None] + torch.arange(t, device=x.device)[None, :]
                cache.k[layer, rows, :, cols] = k.transpose(1, 2)  # (B, T, KV, D)
                cache.v[layer, rows, :, cols] = v.transpose(1, 2)
                s = mask.shape[-1]
            else:
                cache.k[layer, :, :, start:start + t] = k
                cache.v[layer, :, :, start:start + t] = v
                s = start + t
            k = cache.k[layer, :, :, :s]  # (B, KV, S, D)
            v = cache.v[layer, :, :, :s]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.attention_dropout)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.dropout = nn.Dropout(cfg.attention_dropout)


# --------------------------------------------------------------------------------------------
# The model


class Emu3LM(nn.Module):
    """Decoder + untied output head. `forward` gives fp32 logits; `hidden_states` + `logits` split it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, the PAD row zero, norms one."""
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, std, generator=generator)
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      key_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None, start: int | torch.Tensor = 0) -> torch.Tensor:
        """(B, T) ids -> (B, T, hidden). With a cache, the T new tokens sit at columns [start, start+T).

        `start` may be a (B,) tensor: row b's tokens go to columns start[b] .. start[b] + T - 1, and token i
        attends to the columns where `key_mask` (B, S) is True (the filled ones) and to the row's new
        columns up to its own (S >= T + the largest start); `positions` are required."""
        cfg = self.config
        b, t = input_ids.shape
        if isinstance(start, torch.Tensor):
            if cache is None or positions is None or key_mask is None or start.shape != (b,):
                raise InputError("per-row cache columns need a cache, positions and a key_mask")
            if key_mask.shape[1] < int(start.max()) + t:
                raise InputError(f"key_mask covers {key_mask.shape[1]} columns, fewer than the new tokens reach "
                                 f"({int(start.max()) + t})")
            if key_mask.shape[1] > cache.max_len:
                raise InputError(f"sequence of {key_mask.shape[1]} tokens does not fit the KV cache of "
                                 f"{cache.max_len}")
        elif cache is not None and start + t > cache.max_len:
            raise InputError(f"sequence of {start + t} tokens does not fit the KV cache of {cache.max_len}")
        if positions is None:
            positions = positions_for_documents(document_ids) if document_ids is not None else \
                torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        x = self.model.dropout(self.model.embed_tokens(input_ids))
        cos, sin = rope(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_factor, x.dtype)
        mask = attention_mask(t, start, key_mask, document_ids, input_ids.device)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, start)
        return self.model.norm(x)

    def decode_step(self, token: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per cache row, shaped for a GPU: (B,) ids at positions and columns `lengths` (B,)
        -> (B, hidden). Every call has the same shapes: attention reads every column of the cache under
        a mask of the filled ones (columns < lengths[b]) and the row's own; nothing is checked on the host,
        so a compiled step runs without synchronising (the caller keeps lengths < cache.max_len). Its slow
        twin is `hidden_states` with per-row `start`, over the filled columns only."""
        cfg = self.config
        cols = torch.arange(cache.max_len, device=token.device)
        mask = (cols[None, :] <= lengths[:, None])[:, None, None]  # (B, 1, 1, S): filled columns and its own
        x = self.model.embed_tokens(token[:, None])  # (B, 1, H)
        cos, sin = rope(lengths[:, None], cfg.head_dim, cfg.rope_theta, cfg.rope_factor, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, lengths)
        return self.model.norm(x)[:, 0]

    def tokens_at(self, tokens: torch.Tensor, columns: torch.Tensor, key_mask: torch.Tensor,
                  cache: KVCache) -> torch.Tensor:
        """T new tokens per cache row at any columns (B, T), which are also their positions (rows filled from
        column 0, unpadded); token i attends to the columns where key_mask (B, T, S) is True, S =
        cache.max_len (the caller includes the token's own column). (B, T, hidden). For decoding out of
        raster order (`emu3.zipar`); its slow twin is `hidden_states` with per-row `start`."""
        cfg = self.config
        x = self.model.embed_tokens(tokens)  # (B, T, H)
        cos, sin = rope(columns, cfg.head_dim, cfg.rope_theta, cfg.rope_factor, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, key_mask[:, None], cache, i, columns)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor, vocab: slice | None = None) -> torch.Tensor:
        """fp32 logits, optionally over a contiguous slice of the vocabulary (e.g. the visual ids)."""
        w = self.lm_head.weight if vocab is None else self.lm_head.weight[vocab]
        return F.linear(hidden, w).float()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                label_weights: torch.Tensor | None = None, reduction: str = "sum", loss_chunk: int | None = None,
                **kwargs) -> torch.Tensor:
        """fp32 logits (B, T, V); or, with `labels` (B, T; -100 = none), the token cross-entropy:
        sum(ce * label_weights) with reduction="sum", or per position (B, T) with "none".

        The output head runs only on positions that have a label: padding, prompts and spans the loss
        mask excludes (the image of an image-to-text sample) cost nothing there. When the fp32 logits
        of those positions would pass 1 GiB (long sequences, 184k-id vocabulary), the loss is
        computed `loss_chunk` positions at a time, each chunk recomputed in backward; otherwise in one
        piece. The loss lives in `forward` so that wrappers that hook the forward (FSDP2, DDP) see the
        output head used.
        """
        hidden = self.hidden_states(input_ids, **kwargs)
        if labels is None:
            return self.logits(hidden)
        if label_weights is None:
            label_weights = (labels != -100).float()
        # the head only runs where there is a label (not on padding, prompts or masked-out spans)
        valid = labels != -100
        h, y, w = hidden[valid], labels[valid], label_weights[valid]  # (N, H), (N,), (N,)
        if len(y) == 0:  # no label anywhere: one weightless position keeps the head in the graph (DDP)
            h, y, w = hidden.reshape(-1, hidden.shape[-1])[:1], labels.new_zeros(1), label_weights.new_zeros(1)
        n = len(y)
        if loss_chunk is None:
            loss_chunk = max(1, (1 << 28) // self.config.vocab_size)  # 2^28 fp32 logits = 1 GiB
        parts = []
        for s in range(0, n, loss_chunk):
            args = (h[s:s + loss_chunk], y[s:s + loss_chunk], w[s:s + loss_chunk])
            if torch.is_grad_enabled() and loss_chunk < n:
                parts.append(checkpoint(self._chunk_loss, *args, use_reentrant=False))
            else:
                parts.append(self._chunk_loss(*args))
        ce = torch.cat(parts)  # (N,) weighted
        if reduction == "sum":
            return ce.sum()
        full = hidden.new_zeros(labels.shape, dtype=torch.float32)
        full[valid] = ce[:int(valid.sum())]
        return full

    def _chunk_loss(self, hidden, labels, weights) -> torch.Tensor:
        logits = self.lm_head(hidden).float()  # (n, V)
        return F.cross_entropy(logits, labels, reduction="none") * weights


def positions_for_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where the document id changes along each row: (B, T) -> (B, T)."""
    t = document_ids.shape[1]
    idx = torch.arange(t, device=document_ids.device).expand_as(document_ids)
    new_doc = torch.ones_like(document_ids, dtype=torch.bool)
    new_doc[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.where(new_doc, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start index of each doc
    return idx - starts


def attention_mask(t: int, start: int | torch.Tensor, key_mask: torch.Tensor | None,
                   document_ids: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask (True = attend) for T new tokens after `start` cached ones, or None
    for a plain causal forward. S = start + T; with per-row columns (`start` a (B,) tensor), S is
    key_mask's width and new token i of row b sees the row's key_mask columns and its new columns
    start[b] .. start[b] + i."""
    if isinstance(start, torch.Tensor):
        k = torch.arange(key_mask.shape[1], device=device)[None, None, :]  # (1, 1, S)
        first = start[:, None, None]  # (B, 1, 1)
        own = (k >= first) & (k <= first + torch.arange(t, device=device)[None, :, None])  # (B, T, S)
        return (key_mask.bool()[:, None, :] | own)[:, None]
    if key_mask is None and document_ids is None and start == 0:
        return None  # SDPA's own causal mask
    s = start + t
    q = torch.arange(start, s, device=device)[:, None]
    k = torch.arange(s, device=device)[None, :]
    mask = (k <= q)[None, None]  # (1, 1, T, S) causal
    if key_mask is not None:
        if key_mask.shape[1] != s:
            raise InputError(f"key_mask covers {key_mask.shape[1]} positions, expected {s}")
        mask = mask & key_mask.bool()[:, None, None, :]
    if document_ids is not None:
        if start:
            raise InputError("document_ids are for packed training sequences, not for cached decoding")
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return mask | (k == q)[None, None]  # a token always sees itself: padded rows stay finite
