"""The `emu3` command: argument parsing only; the work is done by the library.

Errors about the user's input (emu3.errors.Emu3Error) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import __version__, media
from .errors import Emu3Error, InputError
from .fsutil import atomic_file
from .metrics import psnr, ssim
from .tokenizer import TextTokenizer
from .vision import MODES, PRESET_PROCESSORS, VisionTokenizer
from .vq import num_parameters

DTYPES = ("float32", "bfloat16", "float16")
NO_TOKENIZER = ("--tokenizer DIR is required until the built-in model ships: pass a vision tokenizer folder "
                "(config.json + model.safetensors): BAAI's Emu3-VisionTokenizer, an Emu3-*-hf folder, a "
                "transformers Emu3VQVAE folder, or one made by `emu3 vq init`")


def _device_dtype(args):
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {args.device}: MPS is not available on this machine")
    return device, dtype


def _tokenizer(args):
    if not args.tokenizer:
        raise InputError(NO_TOKENIZER)
    device, dtype = _device_dtype(args)
    return VisionTokenizer.from_pretrained(args.tokenizer, device=device, dtype=dtype, frame_batch=args.frame_batch)


def _read_input(tok, args):
    """-> ('image', (H, W, 3) uint8, None) or ('video', (T, H, W, 3) uint8, fps)."""
    kind = media.probe(args.input)
    if kind == "image":
        image = media.open_image(args.input)
        return kind, tok.processor.resize(image), None
    video = tok.read_video(args.input, fps=args.fps, start=args.start, duration=args.duration,
                           max_frames=args.max_frames, frame_limit=args.frame_limit)
    return kind, video.frames, video.fps


def _encode(tok, kind, frames, mode):
    return tok.encode_images([frames])[0] if kind == "image" else tok.encode_video(frames, mode)


def cmd_vq_init(args) -> None:
    tok = VisionTokenizer.from_preset(args.preset, seed=args.seed)
    tok.save_pretrained(args.output, layout=args.layout)
    print(f"wrote {args.output}: preset {args.preset}, {num_parameters(tok.model):,} parameters, "
          f"random weights (seed {args.seed}), {args.layout} layout")


def cmd_vq_convert(args) -> None:
    tok = VisionTokenizer.from_pretrained(args.input, dtype=None)  # keep the weights' dtype
    tok.save_pretrained(args.output, layout=args.layout)
    print(f"wrote {args.output} ({args.layout} layout)")


def cmd_vq_encode(args) -> None:
    out = Path(args.output)
    if out.suffix != ".npy":
        raise InputError(f"{out}: codes are written as .npy")
    tok = _tokenizer(args)
    kind, frames, fps = _read_input(tok, args)
    codes = _encode(tok, kind, frames, args.mode).numpy().astype(np.int64)
    with atomic_file(out) as tmp:
        np.save(tmp, codes)
    meta = {"kind": kind, "shape": list(codes.shape), "pixels": list(frames.shape[-3:-1]), "source": str(args.input)}
    if kind == "video":
        meta.update(mode=args.mode, fps=fps, num_frames=len(frames))
    with atomic_file(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    what = f"{codes.shape[0]}x{codes.shape[1]}" if kind == "image" else "x".join(map(str, codes.shape))
    print(f"wrote {out}: {kind} codes {what} ({codes.size} tokens)" +
          (f", {len(frames)} frames at {fps:g} fps, {args.mode} mode" if kind == "video" else ""))


def _load_codes(path: Path):
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        codes = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a .npy array of codes ({e})") from None
    if codes.ndim not in (2, 3) or codes.dtype.kind not in "iu":
        raise InputError(f"{path}: codes must be an integer array (h, w) or (T', h, w), "
                         f"got {codes.shape} {codes.dtype}")
    meta = {}
    side = path.with_suffix(".json")
    if side.exists():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{side}: not valid JSON ({e})") from None
    return codes.astype(np.int64), meta


def cmd_vq_decode(args) -> None:
    codes, meta = _load_codes(Path(args.codes))
    kind = "image" if codes.ndim == 2 else "video"
    media.check_output_suffix(args.output, kind)
    tok = _tokenizer(args)
    if kind == "image":
        frames = tok.decode_image(torch.from_numpy(codes))
    else:
        mode = args.mode or meta.get("mode", "chunks")
        num_frames = args.num_frames or meta.get("num_frames")
        frames = tok.decode_video(torch.from_numpy(codes), mode, num_frames)
    fps = args.fps or meta.get("fps") or 24.0
    media.write_media(args.output, frames, fps)
    print(f"wrote {args.output}: " + (f"{frames.shape[1]}x{frames.shape[0]} image" if kind == "image" else
                                       f"{len(frames)} frames of {frames.shape[2]}x{frames.shape[1]} at {fps:g} fps"))


def cmd_vq_reconstruct(args) -> None:
    tok = _tokenizer(args)
    kind, frames, fps = _read_input(tok, args)
    media.check_output_suffix(args.output, kind)
    codes = _encode(tok, kind, frames, args.mode)
    if kind == "image":
        recon = tok.decode_image(codes)
    else:
        recon = tok.decode_video(codes, args.mode, num_frames=len(frames))
    media.write_media(args.output, recon, fps or 24.0)
    n = 1 if kind == "image" else len(frames)
    h, w = frames.shape[-3:-1]
    grid = "x".join(map(str, codes.shape))
    mode = f", {args.mode} mode" if kind == "video" else ""
    print(f"PSNR {psnr(frames, recon):.2f} dB  SSIM {ssim(frames, recon):.4f}  "
          f"({n} frame{'s' * (n > 1)} at {w}x{h}, codes {grid}{mode}); wrote {args.output}")


def cmd_tokenizer_train(args) -> None:
    paths = [Path(p) for p in args.text]
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: no such text file")

    def lines():
        for p in paths:
            with open(p, encoding="utf-8", errors="replace") as f:
                yield from f

    tok = TextTokenizer.train(lines(), args.vocab_size, args.codebook_size, args.min_frequency)
    tok.save_pretrained(args.output)
    print(f"wrote {args.output}: {tok.vocab.text_size} text tokens + 211 control tokens + "
          f"{tok.vocab.codebook_size} visual tokens = {tok.vocab.size} ids")


def cmd_tokenizer_encode(args) -> None:
    tok = TextTokenizer.from_pretrained(args.tokenizer)
    print(" ".join(map(str, tok.encode(args.text, allow_special=not args.plain))))


def cmd_tokenizer_decode(args) -> None:
    tok = TextTokenizer.from_pretrained(args.tokenizer)
    try:
        ids = [int(x) for x in " ".join(args.ids).replace(",", " ").split()]
    except ValueError as e:
        raise InputError(f"ids must be integers ({e})") from None
    print(tok.decode(ids, skip_special_tokens=args.skip_special_tokens))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emu3", description="Emu3: next-token prediction for text, images and video.")
    parser.add_argument("--version", action="version", version=f"emu3 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    vq = sub.add_parser("vq", help="the vision tokenizer: images and videos <-> visual codes")
    vqs = vq.add_subparsers(dest="action", required=True)

    def model_opts(p):
        p.add_argument("--tokenizer", metavar="DIR", help="vision tokenizer folder (released or transformers layout)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
        p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations (default float32)")
        p.add_argument("--frame-batch", type=int, default=8, metavar="N",
                       help="frames per forward pass: bounds memory (default 8)")

    def video_opts(p, with_read=True):
        p.add_argument("--mode", choices=MODES, default="chunks" if with_read else None,
                       help="video: independent 4-frame chunks (official example) or one causal clip")
        if with_read:
            p.add_argument("--fps", type=float, help="video: sample frames at this rate (default: the source rate)")
            p.add_argument("--start", type=float, default=0.0, metavar="SEC", help="video: start time in seconds")
            p.add_argument("--duration", type=float, metavar="SEC", help="video: clip length in seconds")
            p.add_argument("--max-frames", type=int, metavar="N", help="video: keep at most N frames")
            p.add_argument("--frame-limit", type=int, default=1024, metavar="N",
                           help="video: refuse inputs that give more than N frames (default 1024)")

    p = vqs.add_parser("init", help="write a freshly initialised tokenizer folder (random weights) from a preset")
    p.add_argument("--preset", default="emu3", choices=list(PRESET_PROCESSORS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", default="released", choices=("released", "transformers"))
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=cmd_vq_init)

    p = vqs.add_parser("convert", help="rewrite a tokenizer folder in the released or transformers layout")
    p.add_argument("input", metavar="DIR")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--layout", default="released", choices=("released", "transformers"))
    p.set_defaults(func=cmd_vq_convert)

    p = vqs.add_parser("encode", help="image or video file -> codes .npy ((h, w) or (T', h, w), int64)")
    model_opts(p)
    p.add_argument("input", metavar="INPUT", help="image, video file (mp4/webm/gif/...) or folder of frames")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npy")
    video_opts(p)
    p.set_defaults(func=cmd_vq_encode)

    p = vqs.add_parser("decode", help="codes .npy -> image (png/jpg) or video (mp4/webm/gif)")
    model_opts(p)
    p.add_argument("codes", metavar="CODES.npy")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    video_opts(p, with_read=False)
    p.add_argument("--fps", type=float, help="video: playback rate (default: from CODES.json, else 24)")
    p.add_argument("--num-frames", type=int, metavar="N", help="video: trim to N frames (default: from CODES.json)")
    p.set_defaults(func=cmd_vq_decode)

    p = vqs.add_parser("reconstruct", help="encode + decode a file, write the result, print PSNR and SSIM")
    model_opts(p)
    p.add_argument("input", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    video_opts(p)
    p.set_defaults(func=cmd_vq_reconstruct)

    tk = sub.add_parser("tokenizer", help="the text tokenizer: train one, encode and decode")
    tks = tk.add_subparsers(dest="action", required=True)
    p = tks.add_parser("train", help="train a byte-level BPE on text files and write tokenizer.json")
    p.add_argument("text", nargs="+", metavar="TEXT_FILE")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE text tokens (default 8192)")
    p.add_argument("--codebook-size", type=int, default=32768,
                   help="visual codes of the vision tokenizer it will be used with (default 32768)")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=cmd_tokenizer_train)
    p = tks.add_parser("encode", help="print the ids of a text")
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--plain", action="store_true", help="special-token strings stay plain text")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenizer_encode)
    p = tks.add_parser("decode", help="print the text of ids")
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--skip-special-tokens", action="store_true")
    p.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_tokenizer_decode)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except Emu3Error as e:
        print(f"emu3: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emu3: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
