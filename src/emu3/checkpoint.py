"""Checkpoint folders: layouts, key maps, strict safetensors I/O. Never pickle.

Vision tokenizer layouts (detected from config.json, then checked key by key):
- "released": BAAI `Emu3-VisionTokenizer`: config.json (`Emu3VisionVQConfig` fields) +
  model.safetensors, keys as in `emu3.vq` (495 tensors at full size).
- "transformers": `Emu3VQVAE.save_pretrained`: config.json (model_type "emu3_vqgan", renamed
  fields) + model.safetensors or shards with model.safetensors.index.json. transformers renames
  the modules and stores the attention projections as Linear (C, C) instead of 1x1 Conv2d.
- "transformers-full": an `Emu3-*-hf` folder (model_type "emu3", `vq_config` nested): sharded, the
  VQ under "vqmodel." (as transformers writes it) or "model.vqmodel." (its in-memory name).

Loading is strict: the key set and every shape are compared with the model *before* a tensor is
read, and a mismatch is one error that names the missing, unexpected and misshaped keys.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .fsutil import atomic_dir, atomic_file
from .vq import VisionVQ, VQConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# --------------------------------------------------------------------------------------------
# Generic safetensors folders


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def weight_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name in the folder's safetensors weights to its file (single file or index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        files = {name: folder / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
        return files
    single = folder / "model.safetensors"
    if not single.exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise CheckpointError(f"{folder}: only pickle weights ({', '.join(pickles)}); emu3 loads safetensors "
                                  "only and never unpickles (convert them with a tool you trust)")
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return {name: single for name in _header(single)}


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a safetensors header, without reading tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(set(files.values())):
        header = _header(f)
        shapes.update({k: v for k, v in header.items() if k in files})
    return shapes


def read_tensors(files: dict[str, Path], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read tensors `names` (file key -> our key) from their files."""
    by_file: dict[Path, list[str]] = {}
    for key in names:
        by_file.setdefault(files[key], []).append(key)
    out = {}
    for f, keys in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in keys:
                    out[names[key]] = handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read tensor data ({e})") from None
    return out


def check_keys(where: str, got: dict[str, tuple], want: dict[str, tuple]) -> None:
    """Raise one CheckpointError naming missing, unexpected and misshaped keys."""
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = sorted(k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
    if not (missing or unexpected or misshaped):
        return

    def few(keys, fmt=str):
        shown = ", ".join(fmt(k) for k in keys[:3])
        return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if misshaped:
        shown = few(misshaped, lambda k: f"{k}: file {list(got[k])} vs model {list(want[k])}")
        parts.append(f"{len(misshaped)} misshaped ({shown})")
    raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(parts))


# --------------------------------------------------------------------------------------------
# Vision tokenizer: released <-> transformers names

_HF_RULES = [
    (re.compile(r"^encoder\.down\.(\d+)\.attn\.(\d+)\.norm\."), r"encoder.down_block.down.\1.attn_norms.\2."),
    (re.compile(r"^decoder\.up\.(\d+)\.attn\.(\d+)\.norm\."), r"decoder.up_block.up.\1.attn_norms.\2."),
    (re.compile(r"^encoder\.down\."), "encoder.down_block.down."),
    (re.compile(r"^decoder\.up\."), "decoder.up_block.up."),
    (re.compile(r"\.mid\.attn_1\.norm\."), ".middle_block.attn_norm."),
    (re.compile(r"\.mid\."), ".middle_block."),
    (re.compile(r"\.(attn\.\d+|attn_1)\.([qkv])\."), r".\1.\2_proj."),
    (re.compile(r"\.(attn\.\d+|attn_1)\.proj_out\."), r".\1.out_proj."),
]
_HF_LINEAR = re.compile(r"\.(attn\.\d+|attn_1)\.(q_proj|k_proj|v_proj|out_proj)\.weight$")


def hf_vq_key(key: str) -> str:
    """Released VQ key -> transformers `Emu3VQVAE` key."""
    for pattern, repl in _HF_RULES:
        key = pattern.sub(repl, key)
    return key


def vq_key_map(cfg: VQConfig) -> dict[str, str]:
    """{released key: transformers key} for every tensor of a VQ with this config (a bijection)."""
    with torch.device("meta"):
        keys = list(VisionVQ(cfg).state_dict())
    mapping = {k: hf_vq_key(k) for k in keys}
    assert len(set(mapping.values())) == len(mapping), "VQ key map is not one to one"
    return mapping


def hf_vq_shape(hf_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if _HF_LINEAR.search(hf_key) else shape


_HF_FIELDS = {"z_channels": "latent_channels", "double_z": "double_latent", "ch": "base_channels",
              "ch_mult": "channel_multiplier"}


def vq_config_to_hf(cfg: VQConfig) -> dict:
    d = {_HF_FIELDS.get(k, k): v for k, v in cfg.to_dict().items() if k != "dropout"}
    d.update(model_type="emu3_vqgan", hidden_size=cfg.ch * cfg.ch_mult[-1], num_attention_heads=1,
             attention_dropout=0.0)
    return d


def vq_config_from_hf(d: dict, where: str) -> VQConfig:
    if d.get("num_attention_heads", 1) != 1:
        raise CheckpointError(f"{where}: num_attention_heads={d['num_attention_heads']} is not supported "
                              "(the Emu3 VQ uses one head)")
    inverse = {v: k for k, v in _HF_FIELDS.items()}
    known = {"codebook_size", "embed_dim", "in_channels", "out_channels", "temporal_downsample_factor",
             "num_res_blocks", "attn_resolutions", *inverse}
    cfg = VQConfig(**{inverse.get(k, k): v for k, v in d.items() if k in known})
    hidden = d.get("hidden_size", cfg.ch * cfg.ch_mult[-1])
    if hidden != cfg.ch * cfg.ch_mult[-1]:
        raise CheckpointError(f"{where}: hidden_size={hidden} differs from base_channels * channel_multiplier[-1] "
                              f"= {cfg.ch * cfg.ch_mult[-1]}")
    return cfg


# --------------------------------------------------------------------------------------------
# Vision tokenizer: load and save


def vq_layout(folder: Path) -> tuple[str, VQConfig, str, dict[str, Path]]:
    """(layout, config, key prefix, {tensor name: file}) of a VQ checkpoint folder."""
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a checkpoint is a folder (config.json + model.safetensors), got a file")
    cfg_path = folder / "config.json"
    d = read_json(cfg_path)
    where = str(cfg_path)
    files = weight_files(folder)
    try:
        model_type = d.get("model_type")
        if model_type == "emu3" or "vq_config" in d:
            vq = d.get("vq_config")
            if not isinstance(vq, dict):
                raise CheckpointError(f"{where}: an Emu3 -hf config without a vq_config object")
            prefix = "model.vqmodel." if any(k.startswith("model.vqmodel.") for k in files) else "vqmodel."
            return "transformers-full", vq_config_from_hf(vq, where), prefix, files
        if model_type == "emu3_vqgan" or "base_channels" in d:
            return "transformers", vq_config_from_hf(d, where), "", files
        if model_type in (None, "Emu3VisionVQ") and "ch" in d:
            return "released", VQConfig.from_dict(d), "", files
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid vision tokenizer config ({e})") from None
    raise CheckpointError(f"{where}: not a vision tokenizer config (model_type={model_type!r}); expected "
                          "Emu3VisionVQ, emu3_vqgan or emu3")


def read_vq_state(folder: str | os.PathLike) -> tuple[VQConfig, dict[str, torch.Tensor], str]:
    """(config, state dict in released names, layout name); strict: keys and shapes checked first."""
    folder = Path(folder)
    layout, cfg, prefix, files = vq_layout(folder)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in VisionVQ(cfg).state_dict().items()}
    if layout == "released":
        names = {k: k for k in files}
        expected = want
    else:
        to_hf = vq_key_map(cfg)
        names = {prefix + hf: ours for ours, hf in to_hf.items()}
        expected = {prefix + to_hf[k]: hf_vq_shape(to_hf[k], s) for k, s in want.items()}
        if layout == "transformers-full":  # the LM lives beside the VQ; only the VQ part is ours to check
            files = {k: f for k, f in files.items() if k.startswith(prefix)}
    check_keys(str(folder), read_shapes(files), expected)
    state = read_tensors(files, names)
    for k in want:  # transformers' Linear attention weights back to 1x1 convs
        if state[k].shape != want[k]:
            state[k] = state[k].reshape(want[k])
    return cfg, state, layout


def load_vq(folder: str | os.PathLike, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = torch.float32) -> VisionVQ:
    """Load a vision tokenizer from any supported layout, strictly, in eval mode."""
    cfg, state, _ = read_vq_state(folder)
    with torch.device("meta"):
        model = VisionVQ(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def save_vq(model: VisionVQ, folder: str | os.PathLike, layout: str = "released",
            extra_files: dict[str, dict] | None = None) -> None:
    """Write a VQ folder atomically: config.json + model.safetensors (+ extra JSON files)."""
    if layout not in ("released", "transformers"):
        raise CheckpointError(f"unknown layout {layout!r}; choose released or transformers")
    cfg = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if layout == "released":
        config = {"architectures": ["Emu3VisionVQModel"], "model_type": "Emu3VisionVQ", **cfg.to_dict()}
    else:
        to_hf = vq_key_map(cfg)
        state = {to_hf[k]: v.reshape(hf_vq_shape(to_hf[k], tuple(v.shape))) for k, v in state.items()}
        config = {"architectures": ["Emu3VQVAE"], **vq_config_to_hf(cfg)}
    config["torch_dtype"] = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        for name, data in (extra_files or {}).items():
            write_json(tmp / name, data)
