"""The training loop: one process or many (torchrun), next-token or DPO objective, exact resume.

Per step: `grad_accum` micro-batches are drawn first, so the step's total loss weight is known (and
summed over ranks) before any backward; each micro-batch's weighted loss sum is divided by that
total, which makes the update the same whatever the split into ranks and micro-batches (DDP and
FSDP2 average gradients over ranks, hence the factor world). A non-finite loss or gradient norm on
any rank skips the update on every rank, is logged, and `max_nonfinite` in a row stop the run.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import load_model, vision_folder
from ..data.loader import Loader, MixPolicy, PairLoader, pair_batch
from ..errors import Emu3Error, InputError
from ..format import Formatter
from ..model import Emu3LM, model_config
from ..tokenizer import TextTokenizer
from . import state
from .config import TrainConfig
from .loss import dpo_loss, sequence_logprobs
from .parallelize import parallelize

METRICS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "seconds", "skipped"]

# generation defaults of a model trained from scratch: its data's captions as they are (the released
# prompt decoration and negative prompt are words it never read; the unconditional prompt is the empty caption)
SCRATCH_DEFAULTS = {"positive_suffix": "", "negative_prompt": ""}


class NonFiniteError(Emu3Error):
    """Too many non-finite steps in a row."""


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg.validate(world)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(rank, world, device)


def build_model(cfg: TrainConfig, tok: TextTokenizer) -> Emu3LM:
    folder = Path(cfg.model)
    if folder.is_dir():
        model = load_model(folder, dtype=torch.float32)
        if cfg.dropout is not None:
            set_dropout(model, cfg.dropout)
    else:
        overrides = {} if cfg.dropout is None else {"attention_dropout": cfg.dropout}
        if cfg.image_area:
            overrides["image_area"] = cfg.image_area
        model = Emu3LM(model_config(cfg.model, tok.vocab, **overrides))
        model.init_weights(torch.Generator().manual_seed(cfg.seed))
    if model.config.vocab_size != tok.vocab.size:
        raise InputError(f"the model has {model.config.vocab_size} ids but the text tokenizer {tok.vocab.size}")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise InputError(f"seq_len {cfg.seq_len} is longer than the model's context of "
                         f"{model.config.max_position_embeddings} tokens")
    return model


def set_dropout(model: Emu3LM, p: float) -> None:
    """The release's four dropout places: embeddings, attention probabilities, attention and MLP outputs."""
    model.config.attention_dropout = p
    model.model.dropout.p = p
    for layer in model.model.layers:
        layer.dropout.p = p
        layer.self_attn.dropout = p


def data_sources(cfg: TrainConfig) -> list[tuple[str, float]]:
    """(dataset folder, weight) of `data=path[:weight],...`."""
    sources = []
    for item in cfg.data:
        path, _, weight = item.partition(":") if not Path(item).exists() else (item, "", "")
        try:
            sources.append((path, float(weight) if weight else 1.0))
        except ValueError:
            raise InputError(f"data={item!r}: the weight after ':' must be a number") from None
    return sources


@dataclass
class DataInfo:
    """What the datasets say about the model they train: the vision tokenizer they were tokenized with
    and their most common image code grid (h, w) with the tokenizer's spatial factor."""

    vision_tokenizer: str | None
    grid: tuple[int, int] | None
    spatial_factor: int | None


def data_info(cfg: TrainConfig) -> DataInfo:
    from collections import Counter

    from ..data.shards import TokenDataset, image_grids

    visions, factors, grids = set(), set(), Counter()
    for path, _ in data_sources(cfg):
        if not Path(path).is_dir():
            continue  # the loader names it
        ds = TokenDataset(path)
        if ds.index.get("vision_tokenizer"):
            visions.add(ds.index["vision_tokenizer"])
        if ds.index.get("spatial_factor"):
            factors.add(ds.index["spatial_factor"])
        for i, shard in enumerate(ds.shards):
            counts = shard.get("grids")
            if counts is None:  # tokenized before the index counted grids
                counts = image_grids(ds.shard(i)[1])
            grids.update(counts)
    if len(visions) > 1:
        raise InputError("the datasets were tokenized with different vision tokenizers (" + ", ".join(sorted(visions))
                         + "): a model reads one codebook; re-tokenize them with one tokenizer")
    grid = tuple(int(x) for x in grids.most_common(1)[0][0].split("x")) if grids else None
    factor = factors.pop() if len(factors) == 1 else None
    return DataInfo(visions.pop() if visions else None, grid, factor)


def resolve_data(cfg: TrainConfig) -> DataInfo:
    """Fill in what the run's config leaves open from its data, before config.json is written, so that
    the run's export is a complete model folder: the vision tokenizer the data was tokenized with (else
    the starting model's), and for a model trained from scratch the image area of its data."""
    info = data_info(cfg)
    if not cfg.vision_tokenizer:
        if info.vision_tokenizer and Path(info.vision_tokenizer).is_dir():
            cfg.vision_tokenizer = info.vision_tokenizer
        elif Path(cfg.model).is_dir() and vision_folder(cfg.model) is not None:
            cfg.vision_tokenizer = str(vision_folder(cfg.model).resolve())
    if not Path(cfg.model).is_dir() and not cfg.image_area and info.grid and info.spatial_factor:
        h, w = info.grid
        cfg.image_area = h * w * info.spatial_factor ** 2
    return info


def text_tokenizer(cfg: TrainConfig) -> TextTokenizer:
    folder = cfg.text_tokenizer or (cfg.model if Path(cfg.model).is_dir() else "")
    if not folder:
        raise InputError("text_tokenizer=DIR is needed to train a preset model (the folder the data was "
                         "tokenized with)")
    return TextTokenizer.from_pretrained(folder)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, cosine from lr to min_lr, then (anneal > 0) linear decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    cosine_steps = cfg.steps - cfg.warmup - cfg.anneal
    t = step - cfg.warmup
    if t < cosine_steps:
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / max(1, cosine_steps)))
    return cfg.min_lr * max(0.0, 1 - (t - cosine_steps + 1) / max(1, cfg.anneal))


def optimizer_for(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (embeddings included), not on norms. The fused kernel when the
    parameters allow it (one kernel for all tensors instead of several per tensor)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # e.g. parameters of a kind the fused kernel does not take
        return torch.optim.AdamW(groups, **kwargs)


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class _Metrics:
    """metrics.csv (and TensorBoard when installed), on rank 0."""

    def __init__(self, run: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.last_loss = float("nan")
        if not enabled:
            return
        path = run / "metrics.csv"
        rows = []
        if path.exists():  # a resumed run rewrites what came after its checkpoint
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        if rows:
            self.last_loss = float(rows[-1]["loss"])
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRICS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    env = setup(cfg)
    run = Path(cfg.out)
    tok = text_tokenizer(cfg)
    resolve_data(cfg)
    model = build_model(cfg, tok).to(env.device)
    mode = cfg.parallel if cfg.parallel != "auto" else ("fsdp" if env.world > 1 else "none")
    module = parallelize(model, mode, env.device, cfg.activation_checkpointing, cfg.compile)
    optimizer = optimizer_for(module, cfg)
    sources = data_sources(cfg)
    if cfg.dpo:
        loader = PairLoader(sources[0][0], tok.vocab.pad, cfg.batch_size, cfg.seed, env.rank, env.world)
    else:
        policy = MixPolicy(cfg.drop_caption, cfg.caption_after, cfg.video_extension, cfg.t2i_loss, cfg.i2t_loss,
                           cfg.vision_weight, cfg.answer_weight, extension_context=cfg.extension_context)
        loader = Loader(sources, Formatter(tok, cfg.resolved_order()), cfg.seq_len, cfg.batch_size, policy, cfg.seed,
                        env.rank, env.world)
    autocast = use_bf16(cfg.bf16, env.device)
    if env.main and progress:
        print(f"precision: {'bf16 autocast' if autocast else 'fp32'} on {env.device.type} (bf16={cfg.bf16})",
              flush=True)

    start, tokens_seen, streak = 0, 0, 0
    torch.manual_seed(cfg.seed * 1000 + env.rank)  # dropout
    if env.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(cfg.to_json())
    ckpt = state.latest(run) if cfg.resume else None
    if ckpt is not None:
        loop, mine = state.load(ckpt, module, optimizer, env.rank)
        start, tokens_seen, streak = loop["step"], loop["tokens"], loop["nonfinite"]
        loader.load_state_dict(mine["loader"])
        state.set_rng_state(mine["rng"])
        if env.main and progress:
            print(f"resumed from {ckpt} (step {start} of {cfg.steps}"
                  + (": already finished, nothing to train)" if start >= cfg.steps else ")"), flush=True)
    reference = dpo_reference(module, loader, cfg, env, run) if cfg.dpo else None
    metrics = _Metrics(run, start, env.main)
    bar = None
    if progress and env.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    last = {"loss": metrics.last_loss}  # a resumed run that has nothing left reports its last logged loss
    t_run = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            module.train()
            if cfg.dpo:
                loss, tokens = _dpo_step(module, loader, reference, cfg, env, autocast)
            else:
                loss, tokens = _lm_step(module, loader, cfg, env, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            ok = torch.tensor([float(math.isfinite(loss) and math.isfinite(float(grad_norm)))])
            if dist.is_initialized():
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok.item():
                optimizer.step()
                streak = 0
            else:
                streak += 1
                if env.main:
                    print(f"step {step + 1}: non-finite loss {loss} or gradient norm {float(grad_norm)}: update "
                          f"skipped ({streak} in a row, limit {cfg.max_nonfinite})", flush=True)
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens
            seconds = time.perf_counter() - t0
            row = {"step": step + 1, "loss": loss, "lr": lr_at(cfg, step), "grad_norm": float(grad_norm),
                   "tokens": tokens_seen, "tokens_per_s": tokens / seconds, "seconds": seconds,
                   "skipped": int(not ok.item())}
            last = row
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                metrics.log(row)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
                bar.update(1)
            if streak >= cfg.max_nonfinite:
                raise NonFiniteError(f"{streak} non-finite steps in a row (limit max_nonfinite={cfg.max_nonfinite}) "
                                     f"at step {step + 1}; the last complete checkpoint is kept")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                loop = {"step": step + 1, "tokens": tokens_seen, "nonfinite": streak}
                mine = {"loader": loader.state_dict(), "rng": state.rng_state()}
                state.save(run, step + 1, module, optimizer, loop, mine, env.rank, cfg.keep_last)
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
    return {"steps": cfg.steps, "loss": last["loss"], "tokens": tokens_seen,
            "seconds": time.perf_counter() - t_run, "checkpoint": str(state.latest(run))}


def use_bf16(setting: str, device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether training runs under bf16 autocast (weights, gradients and optimizer stay fp32). "auto":
    on CUDA with bf16 support, and on a CPU whose instructions do bf16 natively (AVX512-BF16 or AMX on
    x86, BF16 on Arm; read from Linux's /proc/cpuinfo, so other systems stay fp32): there oneDNN's bf16
    matmuls halve the built-in model's step time on 2 cores, same losses to 3 decimals. Without those
    instructions there is no native bf16 path, so auto stays fp32 (`on` forces autocast anyway)."""
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _autocast(env: Env, enabled: bool):
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=enabled)


def _lm_step(module, loader: Loader, cfg: TrainConfig, env: Env, autocast: bool) -> tuple[float, int]:
    batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
    total = _all_sum(torch.tensor([sum(float(b.weights.sum()) for b in batches)], dtype=torch.float64))
    total_w = max(float(total), 1e-12)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for b in batches:
        with _autocast(env, autocast):
            ls = module(b.input_ids.to(env.device), document_ids=b.document_ids.to(env.device),
                        labels=b.targets.to(env.device), label_weights=b.weights.to(env.device))
        (ls * (env.world / total_w)).backward()
        loss_sum += ls.detach().double().cpu()
    tokens = _all_sum(torch.tensor([sum(b.tokens for b in batches)]))
    return float(_all_sum(loss_sum.view(1))) / total_w, int(tokens)


def _dpo_step(module, loader: PairLoader, reference, cfg: TrainConfig, env: Env, autocast: bool) -> tuple[float, int]:
    batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
    pairs = float(_all_sum(torch.tensor([float(sum(len(b.index) for b in batches))])))
    chosen_tokens = float(_all_sum(torch.tensor([float(sum(int(b.chosen_mask.sum()) for b in batches))])))
    loss_sum = 0.0
    for b in batches:
        dev = env.device
        with _autocast(env, autocast):
            pc, nc = sequence_logprobs(module, b.chosen.to(dev), b.chosen_mask.to(dev))
            pr, _ = sequence_logprobs(module, b.rejected.to(dev), b.rejected_mask.to(dev))
        ref = reference[b.index]  # (B, 2): reference log-probs of chosen, rejected
        dpo = dpo_loss(pc.float(), pr.float(), ref[:, 0].to(dev), ref[:, 1].to(dev), cfg.dpo_beta)
        # DPO averaged over pairs, plus sft_weight x the mean token NLL of the chosen continuations
        loss = dpo.sum() / pairs + cfg.dpo_sft_weight * (-pc.float().sum()) / chosen_tokens
        (loss * env.world).backward()
        loss_sum += float(loss.detach())
    return float(_all_sum(torch.tensor([loss_sum]))), int(chosen_tokens)


@torch.no_grad()
def dpo_reference(module, loader: PairLoader, cfg: TrainConfig, env: Env, run: Path) -> torch.Tensor:
    """Reference log-probs (chosen, rejected) of every preference record under the starting model,
    computed once and stored in RUN/dpo_reference.npy (a resumed run reads them back)."""
    path = run / "dpo_reference.npy"
    n = len(loader.ds)
    if path.exists():
        ref = np.load(path)
        if ref.shape == (n, 2):
            return torch.from_numpy(ref)
    module.eval()
    ref = torch.zeros(n, 2, dtype=torch.float64)
    mine = loader.indices[env.rank::env.world].tolist()
    steps = -(-len(loader.indices) // env.world)  # every rank runs the same number of (collective) forwards
    for i in range(steps):
        chunk = mine[i:i + 1] or mine[:1]
        b = pair_batch(loader.ds, chunk, loader.pad)
        pc, _ = sequence_logprobs(module, b.chosen.to(env.device), b.chosen_mask.to(env.device))
        pr, _ = sequence_logprobs(module, b.rejected.to(env.device), b.rejected_mask.to(env.device))
        if i < len(mine):
            ref[chunk[0]] = torch.stack([pc[0], pr[0]]).double().cpu()
    ref = _all_sum(ref)
    if env.main:
        np.save(path, ref.numpy())
    return ref.float()


def export(run: str | os.PathLike, out: str | os.PathLike, layout: str = "released",
           checkpoint: str | os.PathLike | None = None) -> str | None:
    """Write a run's checkpoint (default: the newest complete one) as a complete model folder: the model,
    its text and vision tokenizers (the ones the data was tokenized with) and generation defaults that fit
    its data. Returns save_model's note when the layout had to differ from the one asked."""
    import json

    from ..checkpoint import read_json, save_model
    from ..vision import VisionTokenizer

    run = Path(run)
    if not (run / "config.json").exists():
        raise InputError(f"{run}: not a training run (no config.json)")
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    ckpt = Path(checkpoint) if checkpoint else state.latest(run)
    if ckpt is None or not (ckpt / "COMMITTED").exists():
        raise InputError(f"{run}: no complete checkpoint to export")
    tok = text_tokenizer(cfg)
    info = resolve_data(cfg)  # runs written before the config recorded these
    model = build_model(cfg, tok)
    state.load_model_state(ckpt, model)
    if cfg.vision_tokenizer and not Path(cfg.vision_tokenizer).is_dir():
        raise InputError(f"{run}: its vision tokenizer {cfg.vision_tokenizer} is gone; an export needs the one the "
                         "data was tokenized with")
    vision = VisionTokenizer.from_pretrained(cfg.vision_tokenizer) if cfg.vision_tokenizer else None
    if vision is not None and vision.model.config.codebook_size != tok.vocab.codebook_size:
        raise InputError(f"the vision tokenizer {cfg.vision_tokenizer} has {vision.model.config.codebook_size} codes "
                         f"but the model's vocabulary {tok.vocab.codebook_size}")
    extra = {}
    if Path(cfg.model).is_dir():  # fine-tuned: keep the starting model's defaults (none: the released recipe)
        if (Path(cfg.model) / "emu3_defaults.json").exists():
            extra["emu3_defaults.json"] = read_json(Path(cfg.model) / "emu3_defaults.json")
    else:  # trained from scratch: the unconditional prompt is the empty caption, no prompt decoration, and
        # images of the data's shape (the area is in config.json: model.config.image_area)
        extra["emu3_defaults.json"] = dict(SCRATCH_DEFAULTS)
        if info.grid and info.grid[0] != info.grid[1]:
            from math import gcd

            h, w = info.grid
            extra["emu3_defaults.json"]["ratio"] = f"{w // gcd(h, w)}:{h // gcd(h, w)}"
    order = cfg.resolved_order()
    if order != "raster" or "order" in extra.get("emu3_defaults.json", {}):  # generation writes what training read
        extra.setdefault("emu3_defaults.json", {})["order"] = order
    if vision is not None:
        extra["vision_tokenizer"] = {"preprocessor_config.json": vision.processor.to_dict()}
    return save_model(model.eval(), out, tokenizer=tok, vq=vision.model if vision else None, layout=layout,
                      extra_files=extra)
