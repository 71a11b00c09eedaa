"""Training a vision tokenizer of the released architecture family on the shapes world
(`emu3 train-vq`).

Objective, per batch: reconstruction (squared error, plus an optional edge term: L1 between the
Sobel gradients of output and input, a cheap stand-in for a perceptual loss since no pretrained
network can be downloaded here) + codebook loss ||sg(z) - e||^2 + commitment beta * ||z - sg(e)||^2,
with the straight-through estimator carrying gradients past the nearest-neighbour lookup.

The first `ae_warmup` steps train a plain autoencoder (no quantisation); then the codebook is set to
k-means centroids of encoder outputs, so that codes start spread over where the latents really are
instead of on a tiny cloud at the origin. Afterwards, codes unused for `restart_every` steps are
moved onto encoder outputs of the current batch drawn in proportion to their quantisation error, so
that most of the codebook stays in use and spare capacity goes to the worst-reconstructed patches
(the few coloured shapes, not the many background cells).

What a small tokenizer of this family needs that the released 8B-era one did not (measured on the
world; see init_temporal_identity): identity-initialised temporal layers, and a learning rate of
about 3e-4, since at 1e-3 the 2D encoder stops passing colour on. Without both, reconstructions
keep the shapes but collapse every colour onto two hues for thousands of steps.

Images are 4 repeated frames (decoded to frame 0, as released); every `video_every`-th step
trains on 16-frame clips instead, which is what teaches the causal temporal layers.

`init=DIR` fine-tunes an existing tokenizer (its codebook kept, dead codes still restarted; with
`train=decoder` only the decoder side learns, so every image and clip keeps its codes and a language
model trained on them needs nothing new) and
`table=F` draws that share of each image batch from the table-top task's frames (emu3.world.table:
rings and a gripper, which the world's scenes never show): the `table` preset is how the VLA policy's
tokenizer learns to see its gripper.

Data is rendered on the fly from the world (seeded per step), so a run needs no dataset and
resumes exactly: model, optimizer and usage counters are checkpointed with emu3.train.state.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..media import to_pixels
from ..vision import PRESET_PROCESSORS, VisionTokenizer
from ..vq import VisionVQ, vq_config
from . import state


@dataclass
class VQTrainConfig:
    preset: str = "demo"  # emu3.vq.VQ_PRESETS
    embed_dim: int = 0  # 0: the preset's (z_channels follows it)
    codebook_size: int = 0  # 0: the preset's
    out: str = "runs/vq"
    steps: int = 3000
    batch_size: int = 16
    video_every: int = 4  # every k-th step is a video step (0: never)
    video_batch: int = 2
    frames: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    commitment: float = 0.25
    edge_weight: float = 0.2
    restart_every: int = 100
    ae_warmup: int = 0  # steps without quantisation before the codebook is fitted (k-means)
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 250
    keep_last: int = 2
    eval_images: int = 64
    init: str = ""  # a tokenizer folder to fine-tune instead of a fresh model
    table: float = 0.0  # share of each image batch drawn from table-top task frames
    train: str = "all"  # "decoder": only the decoder side learns (post_quant_conv, decoder); codes stay the same

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.warmup >= self.steps:
            raise InputError(f"need steps >= 1, batch_size >= 1 and warmup < steps; got steps={self.steps}, "
                             f"batch_size={self.batch_size}, warmup={self.warmup}")
        if not 0 <= self.ae_warmup < self.steps:
            raise InputError(f"ae_warmup must be in [0, steps), got {self.ae_warmup}")
        if self.video_every < 0 or self.frames % 4:
            raise InputError("video_every must be >= 0 and frames a multiple of 4")
        if not 0 <= self.table <= 1:
            raise InputError(f"table is a share of each batch, in [0, 1]; got {self.table}")
        if self.init and not (Path(self.init) / "config.json").is_file():
            raise InputError(f"init={self.init}: not a vision tokenizer folder (no config.json)")
        if self.train not in ("all", "decoder"):
            raise InputError(f"train is 'all' or 'decoder'; got {self.train!r}")
        if self.train == "decoder" and not self.init:
            raise InputError("train=decoder fine-tunes an existing tokenizer's decoder: give init=DIR")
        if self.init and self.ae_warmup:
            raise InputError("ae_warmup is for a fresh model; a fine-tune (init=DIR) keeps its codebook: ae_warmup=0")


VQ_STAGES = {
    # The built-in tokenizer's recipe. lr 1e-3 is too high for the encoder (it stops learning colour)
    # and the Sobel edge term slows early learning, so neither is used here.
    "demo": dict(steps=4000, ae_warmup=1500, lr=3e-4, min_lr=1e-5, edge_weight=0.0),
    # The VLA policy's tokenizer: the built-in one fine-tuned on table-top frames (init=DIR).
    "table": dict(steps=800, lr=1e-4, min_lr=1e-5, warmup=50, video_every=0, table=1.0, edge_weight=0.0,
                  save_every=100),
    # The built-in tokenizer's decoder fine-tuned with a video step every other step (init=DIR; encoder and
    # codebook frozen, so the codes the language model learnt stay the same). Measured (README): the true
    # clips' round trip places 77 % of objects within 4 px instead of 70 %, but generation does not gain,
    # so the built-in model does not use it.
    "demo-video": dict(steps=1200, lr=1e-4, min_lr=1e-5, warmup=50, video_every=2, edge_weight=0.0, train="decoder",
                       save_every=100),
    "tiny": dict(preset="tiny", steps=30, batch_size=4, video_batch=1, frames=8, warmup=5, save_every=10,
                 restart_every=10, eval_images=8),
}


def _batch(step: int, cfg: VQTrainConfig) -> tuple[torch.Tensor, bool]:
    """Pixels in [-1, 1]: images (B, 3, 64, 64), or clips (B, T, 3, 64, 64) on video steps."""
    from ..world.motion import sample_clip
    from ..world.scenes import render, sample_scene

    rng = np.random.default_rng([cfg.seed, step])
    if cfg.video_every and step % cfg.video_every == cfg.video_every - 1:
        clips = np.stack([sample_clip(rng, cfg.frames).render() for _ in range(cfg.video_batch)])
        return to_pixels(clips), True
    tables = round(cfg.batch_size * cfg.table)
    images = [render(sample_scene(rng)) for _ in range(cfg.batch_size - tables)]
    return to_pixels(np.stack(images + table_frames(rng, tables))), False


def table_frames(rng: np.random.Generator, n: int, seeds: range | None = None) -> list[np.ndarray]:
    """n 64x64 frames of noisy expert episodes on the table-top task, at random moments: table views,
    and every other one a 2x2 mosaic of wrist views (32x32 each, so each is exactly 4x4 codes).
    Episodes come from `seeds` in order, or else at random from tables 300,000+ (apart from the
    demonstrations' and the evaluations' seeds)."""
    from ..world.table import record

    out: list[np.ndarray] = []
    k = 0
    while len(out) < n:
        seed = seeds[k] if seeds is not None else 300_000 + int(rng.integers(1 << 30))
        ep, k = record(seed, noise=0.3), k + 1
        pick = rng.choice(len(ep.table), size=4, replace=len(ep.table) < 4)
        if len(out) % 2 == 0:
            out.append(ep.table[pick[0]])
        else:
            w = ep.wrist[pick]  # (4, 32, 32, 3)
            out.append(np.concatenate([np.concatenate(w[:2], 1), np.concatenate(w[2:], 1)], 0))  # (64, 64, 3)
    return out


def _sobel(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], device=x.device, dtype=x.dtype)
    kernel = torch.stack([k, k.t()])[:, None].repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(x, kernel, padding=1, groups=x.shape[1])


def vq_losses(model: VisionVQ, x: torch.Tensor, cfg: VQTrainConfig,
              quantize: bool = True) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Total loss, its parts, and the codes of the batch (no quantisation: a plain autoencoder)."""
    image = x.ndim == 4
    z = model.encode_latents(x)  # (B, C, T', h, w)
    codes = model.quantize(z.detach())  # (B, T', h, w)
    if quantize:
        e = model.embed_codes(codes)  # (B, C, T', h, w)
        codebook = F.mse_loss(e, z.detach())
        commit = F.mse_loss(z, e.detach())
        zq = z + (e - z).detach()  # straight-through
    else:  # the codebook joins the graph with weight 0 so that its optimizer state exists (resume)
        zq, commit = z, torch.zeros(())
        codebook = 0.0 * model.quantize.embedding.weight.sum()
    rec = model.decode_latents(zq, first_frame_only=image)  # (B, T or 1, 3, H, W)
    target = x[:, None] if image else x
    rec, target = rec.flatten(0, 1), target.flatten(0, 1)
    mse = F.mse_loss(rec, target)
    edge = F.l1_loss(_sobel(rec), _sobel(target)) if cfg.edge_weight else torch.zeros(())
    total = mse + cfg.edge_weight * edge + codebook + cfg.commitment * commit
    parts = {"mse": mse, "edge": edge, "codebook": codebook, "commit": commit}
    return total, {k: float(v.detach()) for k, v in parts.items()}, codes


def _lr(cfg: VQTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def _init_codebook(model: VisionVQ, cfg: VQTrainConfig, iters: int = 20, images: int = 1024) -> None:
    """Codebook vectors := k-means centroids (Lloyd, from a random pick) of encoder outputs on
    `images` held-apart images; an empty cluster is moved onto the worst-quantised latent."""
    lat = []
    step = 1 << 40  # batches of their own, apart from the training steps' seeds
    probe = VQTrainConfig(**{**asdict(cfg), "video_every": 0, "batch_size": 64})
    for _ in range(max(1, images // probe.batch_size)):
        x, _ = _batch(step, probe)
        z = model.encode_latents(x)  # (B, C, T', h, w)
        lat.append(z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1]))  # (B*T'*h*w, C)
        step += 1
    lat = torch.cat(lat)
    k = model.config.codebook_size
    g = torch.Generator().manual_seed(cfg.seed)
    book = lat[torch.randint(len(lat), (k,), generator=g)].clone()
    for _ in range(iters):
        dist = torch.cdist(lat, book)  # (N, K)
        near, assign = dist.min(1)
        count = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(book).index_add_(0, assign, lat)
        filled = count > 0
        book[filled] = sums[filled] / count[filled, None]
        empty = torch.nonzero(~filled).flatten()
        if len(empty):
            book[empty] = lat[near.topk(len(empty)).indices]
    model.quantize.embedding.weight.copy_(book)


@torch.no_grad()
def init_temporal_identity(model: VisionVQ, shift: float = 3.0) -> None:
    """Start the non-residual temporal layers (quant_conv, post_quant_conv and the temporal down- and
    upsampling convs) as identities: each output frame copies the newest input frame it sees. The first
    conv of each stack also adds `shift` (and quant_conv takes it off again), so that the swish after
    each of them works in its nearly linear range instead of squashing negative latents.

    With PyTorch's default init these z_channels-wide causal convs shrink the latent (a frame sees
    one of the kernel's temporal slices, the rest is zero padding or past frames; the swishes
    flatten the negative half): standard deviation x0.22 through the encoder's temporal layers and
    x0.08-0.12 through the decoder's, x1.1 from this init. A small tokenizer then learns colour very
    slowly (uniformly coloured images, 100 steps at lr 3e-4: MSE 0.18 from the default init, 0.06
    from this one)."""
    convs = [model.quant_conv.conv, model.post_quant_conv.conv]
    for stack in (model.encoder.time_conv, model.decoder.time_conv):
        convs += [m.conv.conv for m in stack]
    for conv in convs:
        w = conv.weight  # (C_out, C_in, kt, kh, kw)
        w.zero_()
        w[:, :, -1, w.shape[3] // 2, w.shape[4] // 2] = torch.eye(w.shape[0], w.shape[1])
        conv.bias.zero_()
    for stack in (model.encoder.time_conv, model.decoder.time_conv):
        if len(stack):
            stack[0].conv.conv.bias.fill_(shift)
    if len(model.encoder.time_conv):
        model.quant_conv.conv.bias.fill_(-shift)


@torch.no_grad()
def table_psnr(tok: VisionTokenizer, n: int, seed: int = 10_000) -> float:
    """Reconstruction PSNR (dB) of n held-out table-top frames (tables 250,000 + i)."""
    frames = table_frames(np.random.default_rng(seed), n, range(250_000, 250_000 + n))
    codes = tok.encode_images(frames)
    err = [np.mean((tok.decode_image(c.numpy()).astype(np.float64) - f) ** 2) for c, f in zip(codes, frames)]
    return float(np.mean([10 * np.log10(255.0 ** 2 / max(e, 1e-10)) for e in err]))


def evaluate(tok: VisionTokenizer, n: int, seed: int = 10_000) -> dict:
    """The tokenizer benchmark of `emu3 eval` on n held-out images and n // 16 clips."""
    from ..eval.bench import eval_tokenizer

    return eval_tokenizer(tok, n, seed, clips=max(1, n // 16))


def overrides_of(cfg: VQTrainConfig) -> dict:
    out = {}
    if cfg.embed_dim:
        out.update(embed_dim=cfg.embed_dim, z_channels=cfg.embed_dim)
    if cfg.codebook_size:
        out.update(codebook_size=cfg.codebook_size)
    return out


def make_vq_config(preset: str, overrides: list[str]) -> VQTrainConfig:
    import typing

    from .config import coerce

    if preset not in VQ_STAGES:
        raise InputError(f"unknown VQ training preset {preset!r}; choose one of {', '.join(VQ_STAGES)}")
    hints = typing.get_type_hints(VQTrainConfig)
    values = dict(VQ_STAGES[preset])
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in hints:
            raise InputError(f"overrides are key=value with keys {', '.join(sorted(hints))}; got {item!r}")
        values[key] = coerce(key, value, hints[key])
    return VQTrainConfig(**values)


def train_vq(cfg: VQTrainConfig, progress: bool = True) -> dict:
    cfg.validate()
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    processor = PRESET_PROCESSORS[cfg.preset]
    if cfg.init:
        base = VisionTokenizer.from_pretrained(cfg.init)
        model, processor = base.model.float(), base.processor
    else:
        model = VisionVQ(vq_config(cfg.preset, **overrides_of(cfg)))
        init_temporal_identity(model)
    if cfg.train == "decoder":  # encoder, quant_conv and codebook frozen: every image keeps its codes
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.9))
    usage = torch.zeros(model.config.codebook_size)
    start = 0
    ckpt = state.latest(run)
    if ckpt is not None:
        loop, mine = state.load(ckpt, model, optimizer, 0)
        start = loop["step"]
        usage = torch.tensor(mine["usage"])
        state.set_rng_state(mine["rng"])
    elif not cfg.ae_warmup and not cfg.init:  # a fine-tune keeps its codebook
        model.train()
        _init_codebook(model, cfg)
    (run / "config.json").write_text(__import__("json").dumps(asdict(cfg), indent=2))
    metrics_path = run / "metrics.csv"
    rows = []
    if metrics_path.exists():
        with open(metrics_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
    fields = ["step", "loss", "mse", "edge", "codebook", "commit", "video", "lr", "restarted", "seconds"]
    f = open(metrics_path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            model.train()
            if cfg.train == "decoder":  # the encoder's temporal BatchNorms keep their running statistics too
                for frozen in (model.encoder, model.quant_conv, model.quantize):
                    frozen.eval()
            for g in optimizer.param_groups:
                g["lr"] = _lr(cfg, step)
            if cfg.ae_warmup and step == cfg.ae_warmup:
                model.train()
                _init_codebook(model, cfg)
                usage.zero_()
            x, video = _batch(step, cfg)
            loss, parts, codes = vq_losses(model, x, cfg, quantize=step >= cfg.ae_warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            usage += (step >= cfg.ae_warmup) * torch.bincount(codes.flatten(), minlength=len(usage)).float()
            restarted = 0
            if cfg.train == "all" and step >= cfg.ae_warmup and (step + 1 - cfg.ae_warmup) % cfg.restart_every == 0:
                restarted = _restart_dead_codes(model, usage, x, cfg.seed + step)
                usage.zero_()
            writer.writerow({"step": step + 1, "loss": float(loss.detach()), **parts, "video": int(video),
                             "lr": _lr(cfg, step), "restarted": restarted, "seconds": time.perf_counter() - t0})
            f.flush()
            if bar is not None:
                bar.set_postfix(mse=f"{parts['mse']:.4f}", restarted=restarted)
                bar.update(1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                state.save(run, step + 1, model, optimizer, {"step": step + 1, "tokens": 0, "nonfinite": 0},
                           {"usage": usage.tolist(), "rng": state.rng_state(), "loader": {}}, 0, cfg.keep_last)
    finally:
        f.close()
        if bar is not None:
            bar.close()
    tok = VisionTokenizer(model.eval(), processor)
    tok.save_pretrained(run / "tokenizer")
    result = evaluate(tok, cfg.eval_images)
    if cfg.table:
        result["table_psnr"] = table_psnr(tok, cfg.eval_images)
    (run / "eval.json").write_text(__import__("json").dumps(result, indent=2))
    return result


@torch.no_grad()
def _restart_dead_codes(model: VisionVQ, usage: torch.Tensor, x: torch.Tensor, seed: int) -> int:
    """Move codes never chosen since the last restart onto current encoder outputs, drawn in
    proportion to their quantisation error: capacity goes to what is reconstructed worst (the few
    shape patches rather than the many background ones)."""
    dead = torch.nonzero(usage == 0).flatten()
    if len(dead) == 0:
        return 0
    model.eval()
    z = model.encode_latents(x)
    lat = z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])
    book = model.quantize.embedding.weight
    err = torch.cdist(lat, book).min(1).values.pow(2)  # squared distance to the nearest code
    g = torch.Generator().manual_seed(seed)
    pick = lat[torch.multinomial(err + 1e-12, len(dead), replacement=True, generator=g)]
    book[dead] = pick + 0.01 * lat.std() * torch.randn(pick.shape, generator=g)
    return len(dead)
