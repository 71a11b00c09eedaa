"""Checkpoint folders: layouts, key maps, strict safetensors I/O. Never pickle.

Vision tokenizer layouts (detected from config.json, then checked key by key):
- "released": BAAI `Emu3-VisionTokenizer`: config.json (`Emu3VisionVQConfig` fields) +
  model.safetensors, keys as in `emu3.vq` (495 tensors at full size).
- "transformers": `Emu3VQVAE.save_pretrained`: config.json (model_type "emu3_vqgan", renamed
  fields) + model.safetensors or shards with model.safetensors.index.json. transformers renames
  the modules and stores the attention projections as Linear (C, C) instead of 1x1 Conv2d.
- "transformers-full": an `Emu3-*-hf` folder (model_type "emu3", `vq_config` nested): sharded, the
  VQ under "vqmodel." (as transformers writes it) or "model.vqmodel." (its in-memory name).

Language model layouts: "released" (Emu3-Gen / -Chat / -Stage1: config.json with Emu3Config fields,
shards + index, keys as in `emu3.model`) and "transformers" (an -hf folder: `text_config`, the LM
under "text_model.model." / "text_model.lm_head.", or transformers' in-memory "model.text_model.").

Loading is strict: the key set and every shape are compared with the model *before* a tensor is
read, and a mismatch is one error that names the missing, unexpected and misshaped keys.

Which folders a command works on is decided here too (`model_folder`, `vision_folder`): the one the
user named, else the built-in model's, else an error that says what to pass.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, InputError
from .fsutil import atomic_dir, atomic_file
from .model import Emu3LM, ModelConfig
from .tokenizer import Vocabulary
from .vq import VisionVQ, VQConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

NO_MODEL = ("no model: this installation has no built-in model, so pass --model DIR (an Emu3 model folder: "
            "Emu3-Gen, Emu3-Chat, Emu3-Stage1, an Emu3-*-hf folder, or one written by emu3's training)")
NO_TOKENIZER = ("no vision tokenizer: this installation has no built-in model, so pass --tokenizer DIR (a folder "
                "with config.json + model.safetensors: BAAI's Emu3-VisionTokenizer, an Emu3-*-hf folder, a "
                "transformers Emu3VQVAE folder, or one made by `emu3 vq init` / `emu3 train-vq`)")

# --------------------------------------------------------------------------------------------
# Which folder: what the user named, else the built-in model


def model_folder(folder: str | os.PathLike | None = None) -> Path:
    """The model folder to work on: `folder`, else the built-in model's (an error when neither is there)."""
    from .assets import builtin_model

    if folder is None:
        folder = builtin_model()
        if folder is None:
            raise InputError(NO_MODEL)
    return Path(folder)


def vision_folder(model: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None) -> Path | None:
    """Where a model folder's vision tokenizer is: `tokenizer` when given, else MODEL/vision_tokenizer/, else
    MODEL itself when it is an -hf checkpoint (its config.json nests `vq_config`), else None. With neither
    folder named: the built-in model's."""
    if tokenizer is not None:
        return Path(tokenizer)
    if model is None:
        from .assets import builtin_model

        if builtin_model() is None:
            raise InputError(NO_TOKENIZER)
        model = builtin_model()
    model = Path(model)
    if (model / "vision_tokenizer").is_dir():
        return model / "vision_tokenizer"
    config = model / "config.json"
    if config.is_file() and "vq_config" in read_json(config):
        return model
    return None


def vla_folder(folder: str | os.PathLike | None = None) -> Path:
    """A VLA policy folder (a model folder with fast_tokenizer.json): `folder`, else the built-in policy."""
    from .assets import builtin_vla

    if folder is None:
        folder = builtin_vla()
        if folder is None:
            raise InputError("no VLA policy: this installation has no built-in one, so pass --model DIR (a VLA "
                             "model folder with fast_tokenizer.json, as `emu3 build-vla` makes)")
    folder = Path(folder)
    if not (folder / "fast_tokenizer.json").is_file():
        raise InputError(f"{folder} has no fast_tokenizer.json: not a VLA model folder (emu3 build-vla makes one)")
    return folder


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


def hf_vq_problem(cfg: VQConfig) -> str | None:
    """Why transformers' Emu3VQVAE cannot hold this tokenizer, or None when it can."""
    if cfg.norm_groups != 32:
        return (f"the vision tokenizer's GroupNorm has {cfg.norm_groups} groups and transformers' Emu3VQVAE fixes "
                "32")
    return None


def vq_config_to_hf(cfg: VQConfig) -> dict:
    problem = hf_vq_problem(cfg)
    if problem:
        raise CheckpointError(f"{problem}: save this tokenizer in the released layout")
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


# --------------------------------------------------------------------------------------------
# Language model: released (Emu3-Gen / -Chat / -Stage1) and transformers (-hf) folders

_HF_TEXT_PREFIXES = (("text_model.model.", "model."), ("text_model.lm_head.", "lm_head."),  # on disk
                     ("model.text_model.", "model."), ("lm_head.", "lm_head."))  # transformers' in-memory names


def model_config_from_hf(text: dict, where: str) -> ModelConfig:
    """An -hf `text_config` -> ModelConfig (token ids of the image markers follow the Emu3 layout)."""
    rope = text.get("rope_parameters") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
    scaling = text.get("rope_scaling")
    if rope.get("rope_type", "default") not in ("default", None):
        scaling = {"type": rope["rope_type"], "factor": rope.get("factor", 1.0)}
    known = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
             "pad_token_id", "bos_token_id", "eos_token_id", "attention_dropout"}
    d = {k: v for k, v in text.items() if k in known}
    try:
        text_size = d.get("pad_token_id", 151643)  # <|endoftext|> sits right after the BPE ids
        vocab = Vocabulary(text_size, d.get("vocab_size", 184622) - text_size - 211)
        return ModelConfig(**{**d, "rope_theta": theta, "rope_scaling": scaling, "img_token_id": vocab.img,
                              "boi_token_id": vocab.boi, "eoi_token_id": vocab.eoi, "eol_token_id": vocab.eol,
                              "eof_token_id": vocab.eof})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid text_config ({e})") from None


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> an -hf `text_config` (transformers 5 field names)."""
    d = {k: v for k, v in cfg.to_dict().items()
         if k not in ("img_token_id", "boi_token_id", "eoi_token_id", "eol_token_id", "eof_token_id", "image_area",
                      "rope_theta", "rope_scaling", "tie_word_embeddings")}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor != 1.0:
        rope = {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor}
    return {**d, "model_type": "emu3_text_model", "rope_parameters": rope, "tie_word_embeddings": False}


def model_layout(folder: Path) -> tuple[str, ModelConfig, dict[str, str], dict[str, Path]]:
    """(layout, config, {file key: our key}, {file key: file}) of a language-model folder."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    cfg_path = folder / "config.json"
    d = read_json(cfg_path)
    files = weight_files(folder)
    if d.get("model_type") == "emu3_text_model":  # transformers' Emu3ForCausalLM (the LM alone): our key names
        return "transformers-text", model_config_from_hf(d, str(cfg_path)), {k: k for k in files}, files
    if d.get("model_type") == "emu3" or "text_config" in d:
        if not isinstance(d.get("text_config"), dict):
            raise CheckpointError(f"{cfg_path}: an Emu3 -hf config without a text_config object")
        cfg = model_config_from_hf(d["text_config"], str(cfg_path))
        names = {}
        for key in files:
            for old, new in _HF_TEXT_PREFIXES:
                if key.startswith(old):
                    names[key] = new + key[len(old):]
        return "transformers", cfg, names, {k: files[k] for k in names}
    if d.get("model_type") not in (None, "Emu3") or "hidden_size" not in d:
        raise CheckpointError(f"{cfg_path}: not an Emu3 language model config (model_type={d.get('model_type')!r})")
    try:
        cfg = ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: invalid Emu3 config ({e})") from None
    return "released", cfg, {k: k for k in files}, files


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = torch.float32) -> Emu3LM:
    """Load the language model of a released or -hf folder, strictly, in eval mode.

    Keys and shapes are checked from the safetensors headers first; tensors are then read one at a
    time from the memory-mapped files and cast, so the peak is the model in `dtype` plus one tensor.
    """
    folder = Path(folder)
    _, cfg, names, files = model_layout(folder)
    with torch.device("meta"):
        model = Emu3LM(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = read_shapes(files)
    check_keys(str(folder), {names[k]: s for k, s in got.items()}, want)
    by_file: dict[Path, list[str]] = {}
    for key in files:
        by_file.setdefault(files[key], []).append(key)
    state = {}
    for f, keys in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in keys:
                    state[names[key]] = handle.get_tensor(key).to(device=device, dtype=dtype or None)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read tensor data ({e})") from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _write_shards(tmp: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.detach().cpu().contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_model(model: Emu3LM, folder: str | os.PathLike, tokenizer=None, vq: VisionVQ | None = None,
               layout: str = "released", max_shard_bytes: int = 5_000_000_000,
               extra_files: dict[str, dict] | None = None) -> str | None:
    """Write a model folder atomically; returns a note when the layout had to differ from the one asked.

    released: config.json (Emu3Config fields) + shards, the tokenizer as tokenizer.json, and the VQ (if
    given) in `vision_tokenizer/`. transformers: one -hf folder (text_config, vq_config, the LM under
    `text_model.`, the VQ under `vqmodel.`, tokenizer.json), loadable by Emu3ForConditionalGeneration.
    When transformers cannot hold the VQ (none given, or a config its Emu3VQVAE does not have, such as
    GroupNorm groups other than 32), the LM alone in transformers' Emu3ForCausalLM layout and the VQ in
    ours under `vision_tokenizer/`, and the note says why.
    """
    if layout not in ("released", "transformers"):
        raise CheckpointError(f"unknown layout {layout!r}; choose released or transformers")
    cfg = model.config
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    state = dict(model.state_dict())
    extra_files = dict(extra_files or {})
    note = None
    if layout == "transformers":  # transformers' text_config has no image_area: keep it with the defaults
        extra_files["emu3_defaults.json"] = {"image_area": cfg.image_area, **extra_files.get("emu3_defaults.json", {})}
        problem = "there is no vision tokenizer to include" if vq is None else hf_vq_problem(vq.config)
        if problem:
            layout = "transformers-text"
            note = (f"{problem}: wrote the language model in transformers' Emu3ForCausalLM layout"
                    + (" and the vision tokenizer in emu3's layout under vision_tokenizer/" if vq is not None else ""))
    with atomic_dir(folder) as tmp:
        if layout in ("released", "transformers-text"):
            if layout == "released":
                config = {"architectures": ["Emu3ForCausalLM"], "model_type": "Emu3", **cfg.to_dict(),
                          "torch_dtype": dtype}
            else:
                config = {"architectures": ["Emu3ForCausalLM"], **model_config_to_hf(cfg), "dtype": dtype}
            if vq is not None:
                save_vq(vq, tmp / "vision_tokenizer", extra_files=extra_files.get("vision_tokenizer"))
        else:
            state = {("text_model.lm_head." + k[len("lm_head."):]) if k.startswith("lm_head.") else
                     ("text_model." + k): v for k, v in state.items()}
            to_hf = vq_key_map(vq.config)
            state.update({"vqmodel." + to_hf[k]: v.reshape(hf_vq_shape(to_hf[k], tuple(v.shape)))
                          for k, v in vq.state_dict().items()})
            vocab = cfg.vocabulary()
            config = {"architectures": ["Emu3ForConditionalGeneration"], "model_type": "emu3",
                      "text_config": model_config_to_hf(cfg), "vq_config": vq_config_to_hf(vq.config),
                      "vocabulary_map": vocab.special_tokens(), "tie_word_embeddings": False, "dtype": dtype}
        _write_shards(tmp, state, max_shard_bytes)
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
            for f in (tmp / "tokenizer").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "tokenizer").rmdir()
        for name, data in extra_files.items():
            if name != "vision_tokenizer":
                write_json(tmp / name, data)
    return note


def convert_model(folder: str | os.PathLike, dest: str | os.PathLike, layout: str = "released",
                  tokenizer: str | os.PathLike | None = None) -> tuple[str | None, bool]:
    """`emu3 convert`: rewrite a model folder (either layout) in `layout`, with its text tokenizer, its
    vision tokenizer (`tokenizer`, else the folder's: `vision_folder`) and its generation defaults, at the
    weights' own precision. Returns save_model's note (None, or what the layout could not express) and
    whether a vision tokenizer went in."""
    from .tokenizer import TextTokenizer
    from .vision import VisionTokenizer

    folder = Path(folder)
    model = load_model(folder, dtype=None)
    vision_dir = vision_folder(folder, tokenizer)
    vision = VisionTokenizer.from_pretrained(vision_dir, dtype=None) if vision_dir else None
    extra = {}
    if (folder / "emu3_defaults.json").exists():
        extra["emu3_defaults.json"] = read_json(folder / "emu3_defaults.json")
    if vision is not None:  # the processor travels with the tokenizer in either layout
        extra["vision_tokenizer"] = {"preprocessor_config.json": vision.processor.to_dict()}
    note = save_model(model, dest, tokenizer=TextTokenizer.from_pretrained(folder),
                      vq=vision.model if vision else None, layout=layout, extra_files=extra)
    return note, vision is not None
