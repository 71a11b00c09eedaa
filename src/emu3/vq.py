"""The Emu3 vision tokenizer: a MoVQGAN with causal temporal layers (BAAI `Emu3-VisionTokenizer`).

Pixels (B, T, 3, H, W) in [-1, 1] <-> codes (B, T/4, H/8, W/8) in [0, 32768).

What is unusual compared with a textbook VQGAN (reference: shared/reference/emu3-format.md section 1):
- A 2D encoder/decoder runs per frame; time is compressed 4x by two causal temporal downsamples
  (Conv3d kernel (4,3,3), stride (2,1,1)) and two temporal ResNet blocks that use *BatchNorm3d*, so
  eval mode (running statistics) matters. Causal padding is always 2 zero frames at the front,
  whatever the kernel size.
- The decoder is MoVQ: every norm is a SpatialNorm modulated by the raw codebook vectors zq, and
  zq goes through the same temporal layers as z (the two are concatenated on the batch axis).
- Images are encoded as 4 repeated frames and decoded to frame 0. The 2D stages are per frame, so
  we run the 2D encoder once and repeat its latent, and we run the 2D decoder on frame 0 only:
  the released result at a quarter of the cost.
- Attention is one head over all h*w positions of a frame with 1x1-conv projections (kept as
  Conv2d so that the state dict matches the release).

Fast paths, each with a slow twin (`released_computation()` switches them all off; tests compare):
SDPA attention, sub-pixel nearest-upsample convs (`Upsample`), SpatialNorm modulation computed at
latent resolution (`SpatialNorm`), a channels-last 2D encoder, and the image shortcuts above
(`fast=False` in encode/decode).

Parameter names equal the released `model.safetensors` (495 tensors with BatchNorm buffers).
transformers' `Emu3VQVAE` renames them; `emu3.checkpoint` holds that key map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

# --------------------------------------------------------------------------------------------
# Config


@dataclass
class VQConfig:
    """Fields and defaults of the released `Emu3VisionVQConfig` (config.json of Emu3-VisionTokenizer)."""

    codebook_size: int = 32768
    embed_dim: int = 4
    z_channels: int = 4
    double_z: bool = False
    in_channels: int = 3
    out_channels: int = 3
    temporal_downsample_factor: int = 4
    ch: int = 256
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [3])  # level indices, not pixels
    dropout: float = 0.0
    # Not a released field (the release fixes 32 groups). Narrow tokenizers need fewer: GroupNorm(32)
    # over 32 channels is instance norm, which erases each channel's spatial mean, i.e. the colours
    # of flat regions, and a small encoder never learns them back.
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        self.attn_resolutions = [int(a) for a in self.attn_resolutions]
        problems = []
        if self.codebook_size < 2:
            problems.append(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.double_z:
            problems.append("double_z=True is not supported (the released model and quant_conv use z_channels)")
        if self.z_channels != self.embed_dim:
            problems.append(
                f"z_channels ({self.z_channels}) must equal embed_dim ({self.embed_dim}): the decoder runs "
                "z and the codebook vectors through the same temporal layers"
            )
        f = self.temporal_downsample_factor
        if f < 1 or f & (f - 1):
            problems.append(f"temporal_downsample_factor must be a power of 2, got {f}")
        if not self.ch_mult:
            problems.append("ch_mult must not be empty")
        for m in self.ch_mult:
            if self.norm_groups < 1 or (self.ch * m) % self.norm_groups:
                problems.append(f"ch * ch_mult entries must be multiples of norm_groups ({self.norm_groups}), "
                                f"got {self.ch}*{m}")
                break
        bad = [a for a in self.attn_resolutions if not 0 <= a < len(self.ch_mult)]
        if bad:
            problems.append(f"attn_resolutions are level indices in [0, {len(self.ch_mult)}), got {bad}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise InputError("invalid VQConfig: " + "; ".join(problems))

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return self.temporal_downsample_factor

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["norm_groups"] == 32:  # released configs do not have the field
            del d["norm_groups"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        """Build from a released-style config.json dict; metadata keys are ignored, unknown fields refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = {"architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "model_type",
                   "_name_or_path", "name_or_path"}
        unknown = sorted(k for k in d if k not in names and k not in ignored)
        if unknown:
            raise InputError(f"unknown VQ config fields: {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


# Named sizes: overrides of the released defaults.
VQ_PRESETS: dict[str, dict] = {
    # The released Emu3-VisionTokenizer: 270,740,287 parameters, 8x spatial and 4x temporal.
    "emu3": {},
    # Small enough for unit tests (spatial factor 4, codebook 64).
    "tiny": dict(codebook_size=64, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[2]),
    # The built-in model's tokenizer: the release's 8x/4x factors and layout at 1/8 of its width.
    "demo": dict(codebook_size=1024, ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[3],
                 norm_groups=8),
}


def vq_config(name: str = "emu3", **overrides) -> VQConfig:
    if name not in VQ_PRESETS:
        raise InputError(f"unknown VQ preset {name!r}; choose one of {', '.join(VQ_PRESETS)}")
    return VQConfig(**{**VQ_PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# Building blocks (names follow the released modules so that state-dict keys match)


def _group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class CausalConv3d(nn.Module):
    """Conv3d on (B, C, T, H, W) with 'same' spatial padding and 2 zero frames in front (always 2)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        pad: tuple[int, ...] = ()
        for k, s in reversed(list(zip(kernel[1:], stride[1:]))):  # F.pad order: W, then H
            p = k - s
            pad += (p // 2 + p % 2, p // 2)
        self.padding = pad + (2, 0)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one pixel, then a stride-2 3x3 conv (taming style)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _parity_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 conv taps along `dim` after nearest-x2 upsampling -> 2 taps on the input, per output parity.

    Even outputs read input (i-1, i) with taps (k0, k1+k2); odd outputs read (i, i+1) with (k0+k1, k2).
    """
    k0, k1, k2 = w.unbind(dim)
    return torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv.

    Fast path (sub-pixel form): each of the four output phases (row parity a, column parity b) of
    conv3x3(nearest_x2(x)) is a 2x2 conv of x whose taps are sums of the 3x3 taps: 16 instead of 36
    multiply-adds per input pixel, the same result up to float rounding. `use_subpixel = False`
    runs the released form.
    """

    use_subpixel = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_subpixel:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        b, _, h, w = x.shape
        xp = F.pad(x, (1, 1, 1, 1))
        phases = []
        for a, rows in enumerate(_parity_taps(self.conv.weight, 2)):  # (O, I, 2, 3) each
            for bb, k in enumerate(_parity_taps(rows, 3)):  # (O, I, 2, 2)
                phases.append(F.conv2d(xp[:, :, a:a + h + 1, bb:bb + w + 1], k, self.conv.bias))  # (B, O, h, w)
        y = torch.stack(phases, 2)  # (B, O, 4, h, w), phase index 2a + b
        return F.pixel_shuffle(y.reshape(b, -1, h, w), 2)  # (B, O, 2h, 2w)


class SpatialNorm(nn.Module):
    """MoVQ modulation: GroupNorm(x) * conv_y(zq) + conv_b(zq), zq nearest-resized to x.

    Fast path: conv_y and conv_b are 1x1, so they commute with nearest upsampling. We compute the
    modulation at zq's resolution, fold GroupNorm's affine into it, and broadcast it over each
    s x s block in one addcmul, instead of upsampling zq and running two full-size convs.
    `use_fused = False` runs the released form.
    """

    use_fused = True

    def __init__(self, channels: int, zq_channels: int, groups: int = 32):
        super().__init__()
        self.norm_layer = _group_norm(channels, groups)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h, w = zq.shape[-2:]
        if not self.use_fused or hh % h or ww % w:
            zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
            return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)
        g = self.norm_layer
        y, b = self.conv_y(zq), self.conv_b(zq)  # (N, C, h, w)
        scale = y * g.weight[:, None, None]  # (gamma * xhat + beta) * y + b = xhat * scale + shift
        shift = torch.addcmul(b, y, g.bias[:, None, None])
        xhat = F.group_norm(x, g.num_groups, eps=g.eps).reshape(n, c, h, hh // h, w, ww // w)  # s x s blocks
        block = (slice(None), slice(None), slice(None), None, slice(None), None)  # (N, C, h, 1, w, 1)
        return torch.addcmul(shift.contiguous()[block], xhat, scale.contiguous()[block]).view(n, c, hh, ww)


def _norm(channels: int, zq_channels: int | None, groups: int) -> nn.Module:
    return _group_norm(channels, groups) if zq_channels is None else SpatialNorm(channels, zq_channels, groups)


def _apply_norm(norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
    return norm(x) if zq is None else norm(x, zq)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float, zq_channels: int | None = None, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(cin, zq_channels, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, zq_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(_apply_norm(self.norm1, x, zq)))
        h = self.conv2(self.dropout(F.silu(_apply_norm(self.norm2, h, zq))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame, scale 1/sqrt(C)."""

    use_sdpa = True  # class-wide switch; the slow twin is the released bmm/softmax formulation

    def __init__(self, channels: int, zq_channels: int | None = None, groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, zq_channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        nx = _apply_norm(self.norm, x, zq)
        if not self.use_sdpa:
            q = self.q(nx).reshape(b, c, h * w)
            k = self.k(nx).reshape(b, c, h * w)
            v = self.v(nx).reshape(b, c, h * w)
            score = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) / c**0.5, dim=2)  # (B, hw, hw)
            out = torch.bmm(v, score.permute(0, 2, 1)).reshape(b, c, h, w)
            return x + self.proj_out(out)
        tokens = nx.permute(0, 2, 3, 1).reshape(b, 1, h * w, c)  # (B, 1 head, hw, C)
        q = F.linear(tokens, self.q.weight.view(c, c), self.q.bias)
        k = F.linear(tokens, self.k.weight.view(c, c), self.k.bias)
        v = F.linear(tokens, self.v.weight.view(c, c), self.v.bias)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, C)
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w)
        return x + out


class TemporalResnetBlock(nn.Module):
    """BatchNorm3d -> swish -> causal conv (3,3,3), twice, plus the residual; on (B, C, T, h, w)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(channels)
        self.conv1 = CausalConv3d(channels, channels, (3, 3, 3))
        self.norm2 = nn.BatchNorm3d(channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(channels, channels, (3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return x + h


class TemporalDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, (4, 3, 3), (2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TemporalUpsample(nn.Module):
    """Nearest x2 along T only, then a causal (3,3,3) conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, (3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.repeat_interleave(x, 2, dim=2))  # (B, C, 2T, h, w)


def _level(**modules: nn.Module) -> nn.Module:
    m = nn.Module()
    for name, mod in modules.items():
        if mod is not None:
            setattr(m, name, mod)
    return m


def _frames_in_batches(fn, x: torch.Tensor, frame_batch: int | None, *rest: torch.Tensor) -> torch.Tensor:
    """Apply a per-frame function to (N, ...) tensors in chunks of `frame_batch` frames (bounded memory)."""
    n = x.shape[0]
    if not frame_batch or frame_batch >= n:
        return fn(x, *rest)
    return torch.cat([fn(x[i:i + frame_batch], *(r[i:i + frame_batch] for r in rest))
                      for i in range(0, n, frame_batch)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.num_res_blocks = cfg.num_res_blocks
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            blocks, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, cfg.dropout, groups=g))
                cin = cout
                if i in cfg.attn_resolutions:
                    attn.append(AttnBlock(cin, groups=g))
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_level(block=blocks, attn=attn, downsample=None if last else Downsample(cin)))
        self.mid = _level(block_1=ResnetBlock(cin, cin, cfg.dropout, groups=g), attn_1=AttnBlock(cin, groups=g),
                          block_2=ResnetBlock(cin, cin, cfg.dropout, groups=g))
        self.norm_out = _group_norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)
        n_time = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList(TemporalDownsample(cfg.z_channels) for _ in range(n_time))
        self.time_res_stack = nn.Sequential(*(TemporalResnetBlock(cfg.z_channels, cfg.dropout)
                                              for _ in range(cfg.num_res_blocks)))

    def forward_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, z, H/f, W/f): the per-frame 2D encoder."""
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward_temporal(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, T, h, w) -> (B, z, T/4, h, w)."""
        for conv in self.time_conv:
            z = F.silu(conv(z))
        return self.time_res_stack(z)


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        zq_ch, g = cfg.embed_dim, cfg.norm_groups
        self.num_res_blocks = cfg.num_res_blocks
        self.time_res_stack = nn.Sequential(*(TemporalResnetBlock(cfg.z_channels, cfg.dropout)
                                              for _ in range(cfg.num_res_blocks)))
        n_time = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList(TemporalUpsample(cfg.z_channels) for _ in range(n_time))
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _level(block_1=ResnetBlock(cin, cin, cfg.dropout, zq_ch, g), attn_1=AttnBlock(cin, zq_ch, g),
                          block_2=ResnetBlock(cin, cin, cfg.dropout, zq_ch, g))
        up: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout, cfg.dropout, zq_ch, g))
                cin = cout
                if i in cfg.attn_resolutions:
                    attn.append(AttnBlock(cin, zq_ch, g))
            up.insert(0, _level(block=blocks, attn=attn, upsample=Upsample(cin) if i != 0 else None))
        self.up = nn.ModuleList(up)  # up[i] is level i; run from the deepest level up
        self.norm_out = SpatialNorm(cin, zq_ch, g)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward_temporal(self, z: torch.Tensor, zq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z, zq: (B, C, T', h, w) -> both (B, C, 4T', h, w), through shared temporal layers."""
        b = z.shape[0]
        x = torch.cat([z, zq])  # (2B, C, T', h, w)
        x = self.time_res_stack(x)
        for conv in self.time_conv:
            x = F.silu(conv(x))
        return x[:b], x[b:]

    def forward_frames(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents and codebook vectors -> (N, 3, H, W) pixels."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, zq), zq), zq)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h, zq)
                if len(level.attn):
                    h = level.attn[j](h, zq)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


class Quantizer(nn.Module):
    """Nearest-neighbour lookup in a (K, C) codebook (squared L2, the released formula)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) latents -> (B, T, h, w) int64 codes. Distances in fp32, in row chunks."""
        b, c, t, h, w = z.shape
        flat = z.permute(0, 2, 3, 4, 1).reshape(-1, c).float()  # (B*T*h*w, C)
        book = self.embedding.weight.float()  # (K, C)
        book_sq = book.pow(2).sum(1)
        rows = max(1, (1 << 24) // book.shape[0])  # keep each distance block at <= 64 MB
        codes = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
        for i in range(0, flat.shape[0], rows):
            x = flat[i:i + rows]
            d = x.pow(2).sum(1, keepdim=True) + book_sq - 2 * (x @ book.t())
            codes[i:i + rows] = d.argmin(1)
        return codes.view(b, t, h, w)


# --------------------------------------------------------------------------------------------
# The model


class VisionVQ(nn.Module):
    """Emu3 vision tokenizer. `encode`/`decode` are the inference API (no grad, eval semantics)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = CausalConv3d(cfg.z_channels, cfg.embed_dim)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.z_channels)

    # ---- differentiable pieces (training and streaming video use these) ----

    channels_last = True  # run the 2D encoder in NHWC memory (oneDNN/cuDNN convs are faster); False: NCHW

    def encode_frames(self, x: torch.Tensor, frame_batch: int | None = None) -> torch.Tensor:
        """The per-frame 2D encoder: (N, 3, H, W) -> (N, C, h, w)."""
        x = x.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return _frames_in_batches(self.encoder.forward_frames, x, frame_batch).contiguous()

    def encode_temporal(self, z: torch.Tensor) -> torch.Tensor:
        """Frame latents (B, C, T, h, w) -> pre-quantization latents (B, C, T/4, h, w)."""
        return self.quant_conv(self.encoder.forward_temporal(z))

    def decode_temporal(self, quant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook vectors (B, C, T', h, w) -> per-frame (z, zq), each (B, C, 4T', h, w)."""
        return self.decoder.forward_temporal(self.post_quant_conv(quant), quant)

    def decode_frames(self, z: torch.Tensor, zq: torch.Tensor, frame_batch: int | None = None) -> torch.Tensor:
        """The per-frame 2D decoder: (N, C, h, w) twice -> (N, 3, H, W)."""
        return _frames_in_batches(self.decoder.forward_frames, z, frame_batch, zq)

    def encode_latents(self, x: torch.Tensor, frame_batch: int | None = None, fast: bool = True) -> torch.Tensor:
        """(B, 3, H, W) image or (B, T, 3, H, W) video in [-1, 1] -> pre-quantization latents (B, C, T', h, w)."""
        f = self.config.temporal_factor
        if x.ndim == 4 and fast:  # image: the 2D encoder is per frame, so encode once and repeat
            z = self.encode_frames(x, frame_batch)  # (B, C, h, w)
            z = z.unsqueeze(2).expand(-1, -1, f, -1, -1)  # (B, C, f, h, w)
        else:
            if x.ndim == 4:
                x = x.unsqueeze(1).expand(-1, f, -1, -1, -1)  # (B, f, 3, H, W), as released
            b, t = x.shape[:2]
            z = self.encode_frames(x.reshape(b * t, *x.shape[2:]), frame_batch)  # (B*T, C, h, w)
            z = z.view(b, t, *z.shape[1:]).transpose(1, 2)  # (B, C, T, h, w)
        return self.encode_temporal(z)

    def decode_latents(self, quant: torch.Tensor, frame_batch: int | None = None,
                       first_frame_only: bool = False) -> torch.Tensor:
        """Codebook vectors (B, C, T', h, w) -> pixels (B, 4T', 3, H, W), or (B, 1, 3, H, W) with first_frame_only."""
        z, zq = self.decode_temporal(quant)  # (B, C, 4T', h, w) each
        if first_frame_only:
            z, zq = z[:, :, :1], zq[:, :, :1]
        b, c, t, h, w = z.shape
        z = z.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, h, w)
        zq = zq.transpose(1, 2).reshape(b * t, c, h, w)
        out = self.decode_frames(z, zq, frame_batch)  # (B*T, 3, H, W)
        return out.view(b, t, *out.shape[1:])

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T', h, w) codes -> (B, C, T', h, w) codebook vectors."""
        return self.quantize.embedding(codes.to(self.device)).permute(0, 4, 1, 2, 3)

    # ---- inference API ----

    @contextlib.contextmanager
    def inference(self):
        """no_grad and eval mode (BatchNorm running statistics), restoring the previous mode after."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def check_pixels(self, x: torch.Tensor) -> None:
        s, f = self.config.spatial_factor, self.config.temporal_factor
        if x.ndim not in (4, 5) or x.shape[-3] != self.config.in_channels:
            raise InputError(f"pixels must be (B, 3, H, W) or (B, T, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[-1] % s or x.shape[-2] % s or x.shape[-1] < s or x.shape[-2] < s:
            raise InputError(f"height and width must be positive multiples of {s}, got {x.shape[-2]}x{x.shape[-1]}")
        if x.ndim == 5 and (x.shape[1] == 0 or x.shape[1] % f):
            raise InputError(f"a video needs a multiple of {f} frames, got {x.shape[1]} "
                             "(emu3.vision.pad_frames repeats the last frame)")

    def check_codes(self, codes: torch.Tensor) -> None:
        k = self.config.codebook_size
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise InputError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
            raise InputError(f"codes must be in [0, {k}), got values in [{int(codes.min())}, {int(codes.max())}]")

    def encode(self, x: torch.Tensor, frame_batch: int | None = None, fast: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h, w) codes; (B, T, 3, H, W) -> (B, T/4, h, w) codes."""
        self.check_pixels(x)
        with self.inference():
            codes = self.quantize(self.encode_latents(x, frame_batch, fast))
        return codes[:, 0] if x.ndim == 4 else codes

    def decode(self, codes: torch.Tensor, frame_batch: int | None = None, fast: bool = True) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, H, W); (B, T', h, w) -> (B, 4T', 3, H, W); values roughly in [-1, 1]."""
        codes = torch.as_tensor(codes)
        if codes.ndim not in (3, 4):
            raise InputError(f"codes must be (B, h, w) for images or (B, T', h, w) for videos, "
                             f"got shape {tuple(codes.shape)}")
        self.check_codes(codes)
        image = codes.ndim == 3
        codes = codes.long().unsqueeze(1) if image else codes.long()  # (B, T', h, w)
        with self.inference():
            out = self.decode_latents(self.embed_codes(codes), frame_batch, first_frame_only=image and fast)
        return out[:, 0] if image else out

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.conv.weight.dtype


@contextlib.contextmanager
def released_computation():
    """Turn every fast path off (SDPA, sub-pixel upsampling, fused SpatialNorm, NHWC): the released math."""
    switches = [(AttnBlock, "use_sdpa"), (Upsample, "use_subpixel"), (SpatialNorm, "use_fused"),
                (VisionVQ, "channels_last")]
    saved = [getattr(cls, name) for cls, name in switches]
    try:
        for cls, name in switches:
            setattr(cls, name, False)
        yield
    finally:
        for (cls, name), value in zip(switches, saved):
            setattr(cls, name, value)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
