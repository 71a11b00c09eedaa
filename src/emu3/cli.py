"""The `emu3` command: argument parsing only; the work is done by the library.

Errors about the user's input (emu3.errors.Emu3Error) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from . import __version__, media, threads
from .errors import Emu3Error, InputError
from .format import Text
from .fsutil import atomic_file
from .metrics import psnr, ssim
from .tokenizer import TextTokenizer
from .vision import MODES, PRESET_PROCESSORS, VisionTokenizer
from .vq import num_parameters

DTYPES = ("auto", "float32", "bfloat16", "float16")


WORLD = ("the built-in model knows only the shapes world (64x64 pictures of circles, squares and triangles in six "
         "colours)")
WORLD_HELP = ("Without --model this runs the built-in model, which knows only the shapes world (64x64 pictures of "
              "circles, squares and triangles in six colours): on other inputs its output means nothing. With BAAI's "
              "released checkpoints: ")
RELEASED_FORM = {  # the same command on BAAI's released checkpoints (folders named as released)
    "chat": "emu3 chat --model Emu3-Chat --tokenizer Emu3-VisionTokenizer --image {input} \"What is in the image?\"",
    "vq": "emu3 vq {action} --tokenizer Emu3-VisionTokenizer {input} -o OUT",
    "extend-video": "emu3 extend-video {input} \"PROMPT\" --model Emu3-Gen --tokenizer Emu3-VisionTokenizer -o OUT.mp4",
    "inpaint": "emu3 inpaint {input} \"PROMPT\" --model DIR -o OUT.png  (DIR: a model trained with order=spiral)",
    "generate": "emu3 generate \"a shiba inu\" --model Emu3-Gen --tokenizer Emu3-VisionTokenizer -o OUT.png",
    "generate-video": "emu3 generate-video \"PROMPT\" --model DIR -o OUT.mp4  (DIR: a model trained on video)",
    "serve": "emu3 serve --model Emu3-Gen --tokenizer Emu3-VisionTokenizer",
}


def _world_note(args, input_path, height: int, width: int) -> None:
    """One note on stderr when a built-in model (no --model / --tokenizer given) reads an input that is not
    of the shapes world's size: it will be resized to the model's size, and the result means nothing."""
    from .world.scenes import SIZE

    builtin = getattr(args, "model", None) is None and getattr(args, "tokenizer", None) is None
    if not builtin or (height, width) == (SIZE, SIZE):
        return
    form = RELEASED_FORM[args.command].format(input=input_path, action=getattr(args, "action", ""))
    print(f"emu3: note: {WORLD}; {input_path} is {width}x{height}, so expect nonsense. For real inputs use a released "
          f"checkpoint: {form}", file=sys.stderr)


def _device_dtype(args):
    device = torch.device(args.device)
    if args.dtype == "auto":  # bf16 on accelerators, fp32 on the CPU
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {args.device}: MPS is not available on this machine")
    return device, dtype


def _tokenizer(args):
    from .checkpoint import vision_folder

    folder = vision_folder(None, args.tokenizer)  # --tokenizer, else the built-in model's
    device, dtype = _device_dtype(args)
    return VisionTokenizer.from_pretrained(folder, device=device, dtype=dtype, frame_batch=args.frame_batch)


def _read_input(tok, args):
    """-> ('image', (H, W, 3) uint8, None) or ('video', (T, H, W, 3) uint8, fps); sets the threads for it."""
    kind = media.probe(args.input)
    if kind == "image":
        image = media.open_image(args.input)
        _world_note(args, args.input, image.height, image.width)
        frames, fps = tok.processor.resize(image), None
    else:
        video = tok.read_video(args.input, fps=args.fps, start=args.start, duration=args.duration,
                               max_frames=args.max_frames, frame_limit=args.frame_limit)
        frames, fps = video.frames, video.fps
        _world_note(args, args.input, *video.source_size)
    _set_threads(args, threads.vq_flops(tok.model, *frames.shape[-3:-1]))
    return kind, frames, fps


def _encode(tok, kind, frames, mode):
    return tok.encode_images([frames])[0] if kind == "image" else tok.encode_video(frames, mode, progress=True)


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
    f = tok.model.config.spatial_factor
    _set_threads(args, threads.vq_flops(tok.model, codes.shape[-2] * f, codes.shape[-1] * f))
    if kind == "image":
        frames = tok.decode_image(torch.from_numpy(codes))
    else:
        mode = args.mode or meta.get("mode", "chunks")
        num_frames = args.num_frames or meta.get("num_frames")
        frames = tok.decode_video(torch.from_numpy(codes), mode, num_frames, progress=True)
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
        recon = tok.decode_video(codes, args.mode, num_frames=len(frames), progress=True)
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


def _pipeline(args, rows: int = threads.DECODE_ROWS):
    from .pipeline import Emu3

    device, dtype = _device_dtype(args)
    emu = Emu3.from_pretrained(args.model, args.tokenizer, device=device, dtype=dtype)  # None: the built-in model
    if getattr(args, "decoding", None):
        emu.defaults.decoding = args.decoding
    if getattr(args, "window", None):  # the window of whichever decoding runs
        emu.defaults.jacobi_window = emu.defaults.rows_window = args.window
    _set_threads(args, threads.lm_flops(emu.model, rows))
    return emu


def _set_threads(args, flops: float) -> None:
    """PyTorch's threads for this command's work (emu3.threads); on an accelerator only an explicit choice."""
    on_cpu = torch.device(getattr(args, "device", "cpu")).type == "cpu"
    threads.configure(flops if on_cpu else float("inf"), args.threads)


def _numbered(path: Path, i: int, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}-{i:03d}{path.suffix}")


def _sampling_kwargs(args) -> dict:
    return dict(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                negative_prompt=args.negative)


def cmd_generate(args) -> None:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise InputError(f"{path}: no such prompts file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError("give a prompt, or --prompts-file with one prompt per line" +
                         (f" ({args.prompts_file} has none)" if args.prompts_file else ""))
    out = Path(args.output)
    media.check_output_suffix(out, "image")
    if args.save_tokens and Path(args.save_tokens).suffix != ".npy":
        raise InputError(f"{args.save_tokens}: tokens are written as .npy")
    emu = _pipeline(args)
    images = emu.generate_images(prompts, n=args.n, ratio=args.ratio, image_area=args.image_area, seed=args.seed,
                                 suffix=args.suffix, batch_size=args.batch_size, progress=not args.quiet,
                                 **_sampling_kwargs(args))
    for i, g in enumerate(images):
        media.write_media(_numbered(out, i, len(images)), g.pixels)
    if args.save_tokens:
        with atomic_file(Path(args.save_tokens)) as tmp:
            np.save(tmp, np.stack([g.codes for g in images]).astype(np.int64))
    (h, w), (ph, pw) = images[0].codes.shape, images[0].pixels.shape[:2]
    where = out if len(images) == 1 else f"{_numbered(out, 0, 2)} ..."
    print(f"wrote {len(images)} image(s) of {pw}x{ph} ({h}x{w} codes) to {where} in "
          f"{sum(g.seconds for g in images):.1f} s")


def cmd_chat(args) -> None:
    from .format import RELEASED_CHAT_TEMPLATE, STAGE1_TEMPLATE

    image = media.open_image(args.image)
    _world_note(args, args.image, image.height, image.width)
    emu = _pipeline(args)
    template = {"released": RELEASED_CHAT_TEMPLATE, "stage1": STAGE1_TEMPLATE}.get(args.template, args.template)
    print(emu.chat(image, args.question, max_new_tokens=args.max_new_tokens, template=template,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   progress=not args.quiet))


def cmd_interleave(args) -> None:
    from .report import save_interleaved

    emu = _pipeline(args)
    segments = emu.generate_interleaved(args.prompt, max_images=args.max_images, max_new_tokens=args.max_new_tokens,
                                        cfg_scale=args.cfg, seed=args.seed, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, progress=not args.quiet)
    page = save_interleaved(args.output, args.prompt, segments)
    images = sum(not isinstance(s, Text) for s in segments)
    print(f"wrote {page}: {len(segments) - images} text segment(s) and {images} image(s)")


def cmd_scaling_run(args) -> None:
    from .train.grid import run_grid

    r = run_grid(args.grid, args.output, progress=not args.quiet, limit=args.cells)
    held = f", {r['skipped']} held by other processes" if r["skipped"] else ""
    print(f"{r['done']} of {r['cells']} cells done{held}; {Path(args.output) / 'runs.csv'}: {r['rows']} rows")


def cmd_scaling_fit(args) -> None:
    from .scaling import fit_runs

    fits = fit_runs(args.runs, task=args.task, holdout=args.holdout, bootstrap=args.bootstrap,
                    min_params=args.min_params, min_tokens=args.min_tokens, holdout_params=args.holdout_params)
    if args.json:  # one task: its fit's object (with "task"); several: task -> fit
        out = {t: f.to_dict() for t, f in fits.items()}
        print(json.dumps({"task": next(iter(out)), **next(iter(out.values()))} if len(out) == 1 else out, indent=2))
        return
    print("| task | E | A | B | alpha | beta | R^2 | MAPE | held-out MAPE | runs |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def cell(f, k: str, v: float) -> str:  # a value and its bootstrap interval
        ci = (f.intervals or {}).get(k)
        return f"{v:.4g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")

    for task, f in fits.items():
        held = f"{f.holdout_mape:.2%}" if f.holdout_mape is not None else "-"
        print(f"| {task} | {cell(f, 'E', f.E)} | {cell(f, 'A', f.A)} | {cell(f, 'B', f.B)} | "
              f"{cell(f, 'alpha', f.alpha)} | {cell(f, 'beta', f.beta)} | {f.r2:.4f} | {f.mape:.2%} | {held} | "
              f"{f.points} |")
    for task, f in fits.items():
        for n, d, obs, pred in f.held_out or []:
            print(f"{task} held out: N={n:,.0f} D={d:,.0f}: observed {obs:.4f}, predicted {pred:.4f} "
                  f"({pred / obs - 1:+.2%})")


def cmd_scaling_plot(args) -> None:
    from .scaling import plot_runs

    out = plot_runs(args.runs, args.output, task=args.task, holdout=args.holdout, min_params=args.min_params,
                    min_tokens=args.min_tokens, holdout_params=args.holdout_params)
    print(f"wrote {out}")


def cmd_generate_video(args) -> None:
    media.check_output_suffix(args.output, "video")
    emu = _pipeline(args)
    g = emu.generate_video(args.prompt, args.frames, ratio=args.ratio, image_area=args.image_area, fps=args.fps,
                           seed=args.seed, progress=not args.quiet, **_sampling_kwargs(args))
    fps = args.fps or emu.defaults.video_fps or 24.0
    media.write_media(args.output, g.pixels, fps)
    grid = "x".join(map(str, g.codes.shape))
    print(f"wrote {args.output}: {len(g.pixels)} frames ({grid} codes) in {g.seconds:.1f} s")


def cmd_extend_video(args) -> None:
    media.check_output_suffix(args.output, "video")
    emu = _pipeline(args)
    vision = emu.require_vision()
    video = vision.read_video(args.input, fps=args.fps, max_frames=args.max_frames)
    _world_note(args, args.input, *video.source_size)
    g = emu.extend_video(video.frames, args.prompt, args.frames, fps=video.fps, seed=args.seed,
                         progress=not args.quiet, **_sampling_kwargs(args))
    media.write_media(args.output, g.pixels, video.fps)
    print(f"wrote {args.output}: {len(video.frames)} given + {len(g.pixels) - len(video.frames)} generated frames "
          f"in {g.seconds:.1f} s")


def cmd_inpaint(args) -> None:
    media.check_output_suffix(args.output, "image")
    image = media.open_image(args.image)
    _world_note(args, args.image, image.height, image.width)
    emu = _pipeline(args)
    g = emu.inpaint(image, args.prompt, args.rings, seed=args.seed, order=args.order, progress=not args.quiet,
                    **_sampling_kwargs(args))
    media.write_media(args.output, g.pixels)
    print(f"wrote {args.output}: kept {args.rings} border rings of {g.codes.shape[0]}x{g.codes.shape[1]} codes")


def cmd_convert(args) -> None:
    from .checkpoint import convert_model

    note, with_vision = convert_model(args.input, args.output, args.layout, args.tokenizer)
    if note:
        print(f"emu3: note: {note}", file=sys.stderr)
    print(f"wrote {args.output} ({args.layout} layout{', with the vision tokenizer' if with_vision else ''})")


def cmd_tokenize_dataset(args) -> None:
    from .checkpoint import model_folder, vision_folder
    from .data.tokenize import Settings, tokenize_dataset

    # the built-in model's tokenizers unless told otherwise, as every command defaults to
    model = model_folder(args.model) if args.model or not args.text_tokenizer else None
    text = str(args.text_tokenizer or model)
    vision = args.tokenizer or (vision_folder(model) if model else None) or model
    vision = str(vision) if vision else None
    settings = Settings(text, vision, args.fps, args.max_frames, args.frame_limit, args.video_mode)
    s = tokenize_dataset(args.input, args.output, settings, args.workers, args.shard_size, progress=not args.quiet,
                         threads=args.threads)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(s["skipped"].items(), key=lambda kv: -kv[1]))
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(s["kinds"].items()))
    kinds = f" ({kinds})" if kinds else ""
    print(f"wrote {args.output}: {s['records']} records{kinds}, {s['tokens']} tokens in {s['shards']} shards"
          f"; skipped: {skipped or 'none'}")
    if s["skipped_inputs"]:
        from .data.tokenize import SKIPPED_REPORT

        first = s["skipped_inputs"][:3]
        more = len(s["skipped_inputs"]) - len(first)
        print("skipped: " + "; ".join(f"{source} ({reason})" for source, reason in first) +
              (f"; {more} more" if more else "") + f"; all of them in {Path(args.output) / SKIPPED_REPORT}")


def cmd_train(args) -> None:
    from .recipes import all_stages
    from .train.config import make_config
    from .train.trainer import train

    out = train(make_config(args.preset, args.overrides, stages=all_stages()), progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {out['steps']} steps, last loss {out['loss']:.4f}, {out['tokens']} tokens in "
              f"{out['seconds']:.1f} s; checkpoint {out['checkpoint']}")


def cmd_train_vq(args) -> None:
    from .train.vq import make_vq_config, train_vq

    cfg = make_vq_config(args.preset, args.overrides)
    result = train_vq(cfg, progress=not args.quiet)
    print(f"wrote {Path(cfg.out) / 'tokenizer'}: held-out image PSNR {result['image_psnr']:.2f} dB, SSIM "
          f"{result['image_ssim']:.4f}; video PSNR {result['video_psnr']:.2f} dB; codebook usage "
          f"{result['codebook_usage']:.0%}")


def cmd_eval(args) -> None:
    from .eval import bench

    emu = _pipeline(args)
    if args.cfg is not None:  # the generation benchmark's guidance (and the video one's), for CFG sweeps
        emu.defaults.cfg_scale = args.cfg
    results = bench.evaluate(emu, generation=args.generation, understanding=args.understanding, video=args.video,
                             tokenizer=args.tokenizer_images, inpainting=args.inpainting, stories=args.stories,
                             seed=args.seed,
                             progress=not args.quiet, split=args.split)
    if args.json:
        with atomic_file(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    print(bench.table(results))
    if args.inpainting and "inpainting" not in results:
        print(f"inpainting: skipped; this model writes images in {emu.defaults.order!r} order, and only a model "
              "trained in the spiral-in order (train ... order=spiral) can keep a border")


def cmd_eval_vla(args) -> None:
    from .action import FASTTokenizer
    from .checkpoint import vla_folder
    from .vla import Policy, evaluate

    args.model = vla_folder(args.model)
    emu = _pipeline(args)
    policy = Policy(emu, FASTTokenizer.from_pretrained(args.model), temperature=args.temperature or 0.0,
                    seed=args.seed, history=args.history)
    r = evaluate(policy, args.episodes, horizon=args.horizon, progress=not args.quiet)
    if args.json:
        with atomic_file(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(r, indent=2))
    print(f"| policy | expert | random | episodes |\n|---|---|---|---|\n"
          f"| {r['policy']:.3f} | {r['expert']:.3f} | {r['random']:.3f} | {r['episodes']} |")
    print(f"{r['actions_per_s']:.1f} actions/s (the expert's loop, no model: {r['expert_actions_per_s']:.0f}); "
          f"time: model {r['share_model']:.0%}, vision tokenizer {r['share_vision']:.0%}, FAST {r['share_fast']:.0%}, "
          f"simulator and the rest {r['share_rest']:.0%}")


def cmd_report(args) -> None:
    from .assets import builtin_vla
    from .report import build_report

    emu = _pipeline(args)
    policy = None
    if args.vla is None and args.model is None:  # the built-in model's report shows the built-in policy too
        args.vla = builtin_vla()
    if args.vla:
        from .action import FASTTokenizer
        from .pipeline import Emu3
        from .vla import Policy

        policy = Policy(Emu3.from_pretrained(args.vla), FASTTokenizer.from_pretrained(args.vla))
    path = build_report(emu, args.output, seed=args.seed, model_name=str(args.model or "the built-in model"),
                        vla=policy, progress=not args.quiet)
    print(f"wrote {path}")


def cmd_serve(args) -> None:
    import os

    try:
        from .server import ServeConfig, serve
    except ImportError as e:
        raise InputError(str(e)) from None
    if args.port < 0 or args.port > 65535:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_rows < 1 or args.max_queue < 0 or args.timeout <= 0:
        raise InputError("--max-rows must be >= 1, --max-queue >= 0 and --timeout > 0")
    emu = _pipeline(args, rows=args.max_rows)  # threads set once, here, for the batch the server runs
    name = Path(args.model).name if args.model else "emu3-demo"
    config = ServeConfig(model_name=name, api_key=args.api_key or os.environ.get("EMU3_API_KEY") or None,
                         max_rows=args.max_rows, max_queue=args.max_queue, timeout=args.timeout,
                         max_body_bytes=args.max_body_mb * 2**20)
    print(f"serving {name} on http://{args.host}:{args.port} (web page at /, API under /v1; Ctrl-C drains and exits)",
          flush=True)
    serve(emu, args.host, args.port, config, log_level=args.log_level)


def cmd_build_demo(args) -> None:
    from .recipes import build_demo

    build_demo(args.output, vq_steps=args.vq_steps, lm_steps=args.lm_steps, seed=args.seed, parts=args.parts,
               progress=not args.quiet)


def cmd_build_vla(args) -> None:
    from .recipes import build_vla

    build_vla(args.output, vision=args.vision, episodes=args.episodes, lm_steps=args.lm_steps,
                   vq_steps=args.vq_steps, seed=args.seed, progress=not args.quiet)


def cmd_export(args) -> None:
    from .train.trainer import export

    note = export(args.run, args.output, args.layout, args.checkpoint)
    if note:
        print(f"emu3: note: {note}", file=sys.stderr)
    print(f"wrote {args.output} ({args.layout} layout)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emu3", description="Emu3: next-token prediction for text, images and video.")
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

    def lm_opts(p, seed: int = 0, seed_help: str = "per-request seed (image j of prompt i: seed + i*n + j)"):
        p.add_argument("--model", metavar="DIR", help="Emu3 model folder (released or -hf layout)")
        p.add_argument("--tokenizer", metavar="DIR",
                       help="vision tokenizer folder (default: DIR/vision_tokenizer, or the -hf folder itself)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
        p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on GPUs, fp32 on the CPU")
        p.add_argument("--seed", type=int, default=seed, help=seed_help)
        p.add_argument("--temperature", type=float, help="0 means greedy")
        p.add_argument("--top-k", type=int, help="0 means off (released images: 2048)")
        p.add_argument("--top-p", type=float, help="1 means off")
        p.add_argument("--decoding", choices=("plain", "jacobi", "rows"),
                       help="jacobi: speculative Jacobi decoding, the same distribution in fewer forward passes "
                            "(1.6x faster for one image of the built-in model on a CPU; not the same samples as "
                            "plain, the default); rows: parallel rows for whole images, NOT lossless (a row starts "
                            "when the one above is --window codes ahead)")
        p.add_argument("--window", type=int, help="draft tokens per pass with jacobi decoding (default 8); with rows, "
                                                  "codes the row above is ahead (default 4)")

    def guidance_opts(p):
        p.add_argument("--cfg", type=float, help="classifier-free guidance scale (released: 3.0; 1 = off)")
        p.add_argument("--negative", help="negative prompt (default: the checkpoint's)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("generate", help="text-to-image")
    p.add_argument("prompt", nargs="*")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="several images: OUT-000.png, ...")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="one prompt per line; blank lines and lines starting with # are skipped")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--ratio", help="'W:H' (default 1:1)")
    p.add_argument("--image-area", type=int, help="pixels (default: the model's, 720*720 for Emu3-Gen)")
    p.add_argument("--suffix", help="appended to each prompt (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save-tokens", metavar="FILE.npy", help="write the code grids as int64 (n, h, w)")
    lm_opts(p)
    guidance_opts(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="answer a question about an image")
    p.add_argument("question")
    p.add_argument("--image", required=True)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--template", default="released",
                   help="released (Emu3-Chat), stage1 (base model captioning), or a template string")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    lm_opts(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("interleave", help="text and images in one answer, the model deciding where images go")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="writes DIR/index.html, DIR/image-K.png and DIR/segments.json")
    p.add_argument("--max-images", type=int, default=8, help="at most this many images (1-8)")
    p.add_argument("--max-new-tokens", type=int, help="default: room for every image and some text")
    lm_opts(p)
    p.add_argument("--cfg", type=float, help="guidance scale for the images (default: the model's; 1 = off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_interleave)

    def runs_filter(p):
        p.add_argument("--min-tokens", type=float, default=0, metavar="D",
                       help="leave out runs of fewer training tokens (budgets before the power-law regime)")
        p.add_argument("--min-params", type=float, default=0, metavar="N", help="leave out smaller models")
        p.add_argument("--holdout-params", type=float, metavar="N",
                       help="fit the smaller models only and predict the runs of N parameters or more (instead of "
                            "--holdout K)")

    sc = sub.add_parser("scaling", help="scaling laws: fit L(N, D) = E + A/N^alpha + B/D^beta to measured runs")
    scs = sc.add_subparsers(dest="action", required=True)
    p = scs.add_parser("run", help="train every (size, token budget) cell of a grid and score it on held-out data; "
                                   "resumable, and several processes can share one grid")
    p.add_argument("grid", metavar="GRID.json", help="sizes, tokens and settings (emu3.train.grid.GridConfig)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="cells, data and DIR/runs.csv")
    p.add_argument("--cells", type=int, help="train at most this many cells, then stop")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_scaling_run)
    p = scs.add_parser("fit", help="Chinchilla approach 3 (Huber on log-loss, L-BFGS from a grid), bootstrap "
                                   "intervals")
    p.add_argument("runs", metavar="RUNS.csv", help="columns task,params,tokens,loss")
    p.add_argument("--task", help="fit this task only (default: each)")
    p.add_argument("--holdout", type=int, default=0, help="leave out the K largest runs and score them as predictions")
    p.add_argument("--bootstrap", type=int, default=100, help="resamples for the 95%% intervals (0: none)")
    p.add_argument("--json", action="store_true", help="one JSON object: E, A, B, alpha, beta, r2, mape, ... (task -> "
                   "that, when several)")
    runs_filter(p)
    p.set_defaults(func=cmd_scaling_fit)
    p = scs.add_parser("plot", help="loss vs tokens, loss vs size and predicted vs observed, with the fitted law")
    p.add_argument("runs", metavar="RUNS.csv", help="columns task,params,tokens,loss")
    p.add_argument("-o", "--output", required=True, metavar="FIG.png", help=".png, .pdf or .svg")
    p.add_argument("--task", help="plot this task only (default: each, a row per task)")
    p.add_argument("--holdout", type=int, default=0, help="fit without the K largest runs and mark them")
    runs_filter(p)
    p.set_defaults(func=cmd_scaling_plot)

    p = sub.add_parser("generate-video", help="text-to-video")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mp4")
    p.add_argument("--frames", type=int, default=4, help="latent frames (4 video frames each)")
    p.add_argument("--fps", type=float)
    p.add_argument("--ratio")
    p.add_argument("--image-area", type=int)
    lm_opts(p)
    guidance_opts(p)
    p.set_defaults(func=cmd_generate_video)

    p = sub.add_parser("extend-video", help="continue a video")
    p.add_argument("input", metavar="VIDEO")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mp4")
    p.add_argument("--frames", type=int, default=2, help="new latent frames (4 video frames each)")
    p.add_argument("--fps", type=float, help="read the input at this rate")
    p.add_argument("--max-frames", type=int, help="use at most this many input frames")
    lm_opts(p)
    guidance_opts(p)
    p.set_defaults(func=cmd_extend_video)

    p = sub.add_parser("inpaint", help="keep an image's border, generate the inside (spiral-in order)")
    p.add_argument("image")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rings", type=int, default=2, help="border rings of codes to keep")
    p.add_argument("--order", default=None, help="visual token order (default: the model's own; only spiral "
                   "can keep a border, so a model trained otherwise needs --order spiral to try)")
    lm_opts(p)
    guidance_opts(p)
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("eval", help="score a model on the shapes world (generation, understanding, video, tokenizer, "
                                    "stories)")
    p.add_argument("--generation", type=int, default=32, metavar="N", help="prompts per category (0: skip)")
    p.add_argument("--understanding", type=int, default=200, metavar="N", help="questions (0: skip)")
    p.add_argument("--video", type=int, default=24, metavar="N", help="clips to extend (0: skip)")
    p.add_argument("--tokenizer-images", type=int, default=128, metavar="N", help="images to reconstruct (0: skip)")
    p.add_argument("--inpainting", type=int, default=64, metavar="N",
                   help="scenes to inpaint (0: skip; run only for a model trained with order=spiral)")
    p.add_argument("--stories", type=int, default=48, metavar="N",
                   help="stories to continue, text and images interleaved (0: skip)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--cfg", type=float, help="guidance scale for generation and video (default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--split", choices=("selection", "report"), default="report",
                   help="held-out seeds: 'selection' (10,000+) to choose settings on, 'report' (110,000+, the "
                        "default, never tuned on) for the figures you publish")
    lm_opts(p, None, "first held-out seed instead of the split's: generation draws from it, understanding from "
                     "+10,000, video +20,000, tokenizer +30,000, inpainting +40,000; training data uses 0")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-vla", help="closed-loop success of a VLA model on the table-top task")
    p.add_argument("--episodes", type=int, default=100, metavar="N", help="held-out tables (seeds 100,000+)")
    p.add_argument("--horizon", type=int, default=80, help="steps per episode")
    p.add_argument("--history", type=int, default=0, choices=(0, 1),
                   help="earlier frames in each prompt (1: the paper's two-frame window; 0, the default, "
                        "avoids the copycat problem: see emu3.vla)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    lm_opts(p)
    p.set_defaults(func=cmd_eval_vla)

    p = sub.add_parser("report", help="write a self-contained HTML report of what a model does")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--vla", metavar="DIR", help="also show this VLA model folder's policy in the loop "
                                                   "(default with the built-in model: the built-in policy)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    lm_opts(p)
    p.set_defaults(func=cmd_report, seed=50_000)

    p = sub.add_parser("serve", help="HTTP API (OpenAI-style) with continuous batching, and a web page")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                                     "(default: $EMU3_API_KEY, else none)")
    p.add_argument("--max-rows", type=int, default=16, help="rows of the running batch (a CFG request takes 2)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests; more are answered 429")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline in seconds (and the largest)")
    p.add_argument("--max-body-mb", type=int, default=16, help="largest request body (413 beyond)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    lm_opts(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("build-demo", help="reproduce the built-in model: tokenizers, data, training, export")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--vq-steps", type=int, help="default: the demo VQ recipe's (emu3.train.vq.VQ_STAGES)")
    p.add_argument("--lm-steps", type=int, help="default: the demo preset's")
    p.add_argument("--parts", type=int, help="language-model parts, each from the last one's weights "
                   "(default: emu3.recipes.builtin.DEMO_PARTS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_build_demo)

    p = sub.add_parser("build-vla", help="train the table-top VLA policy: FAST tokens, demonstrations, "
                                         "behaviour cloning, a DAgger round, export (OUT/emu3-vla)")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--vision", metavar="DIR", help="vision tokenizer to fine-tune on the table (default: the "
                                                   "built-in model's)")
    p.add_argument("--vq-steps", type=int, help="default: the table preset's (train-vq table)")
    p.add_argument("--episodes", type=int, help="expert demonstrations (default 3000)")
    p.add_argument("--lm-steps", type=int, help="steps of each training stage (default: the vla and vla-dagger "
                                                "presets')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_build_vla)

    p = sub.add_parser("convert", help="rewrite a model folder in the released or transformers (-hf) layout")
    p.add_argument("input", metavar="DIR")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--layout", default="released", choices=("released", "transformers"))
    p.add_argument("--tokenizer", metavar="DIR", help="vision tokenizer to include")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("tokenize-dataset", help="images, videos, text, QA, interleaved and DPO records -> token "
                                                "shards for training")
    p.add_argument("input", nargs="+", help="folders (media + .txt/.json captions), .jsonl manifests, .tar shards")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--model", metavar="DIR", help="take the text tokenizer and vision_tokenizer/ from a model folder "
                                                  "(default: the built-in model's)")
    p.add_argument("--text-tokenizer", metavar="DIR")
    p.add_argument("--tokenizer", metavar="DIR", help="vision tokenizer folder")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--shard-size", type=int, default=1000, help="input records per shard")
    p.add_argument("--fps", type=float, help="video: sample frames at this rate")
    p.add_argument("--max-frames", type=int, help="video: at most N frames per clip")
    p.add_argument("--frame-limit", type=int, default=1024)
    p.add_argument("--video-mode", choices=MODES, default="causal")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tokenize_dataset)

    from .recipes import all_stages

    p = sub.add_parser("train", help="train or fine-tune (one process, or under torchrun)",
                       description="emu3 train PRESET [key=value ...]; presets: " + ", ".join(all_stages()))
    p.add_argument("preset", help="a stage preset: " + ", ".join(all_stages()))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data=runs/data steps=500 out=runs/x")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-vq", help="train a vision tokenizer on the shapes world (resumes from out=DIR)")
    p.add_argument("preset", help="demo (the built-in tokenizer) or tiny")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps=4000 out=runs/vq")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_vq)

    p = sub.add_parser("export", help="write a training run's checkpoint as a model folder")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--layout", default="released", choices=("released", "transformers"))
    p.add_argument("--checkpoint", metavar="CKPT_DIR", help="default: the newest complete one")
    p.set_defaults(func=cmd_export)

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
    _finish(parser)
    return parser


# The range of every number an option takes (by argparse dest), checked when the command line is parsed,
# so a bad value is one line naming the option and the limit, before anything is loaded. Every int or
# float option must be listed here (build_parser checks).
_ABOVE_0 = "above 0"  # a lower bound that excludes 0 itself
_RANGES: dict[str, tuple[float | str, float | None]] = {  # (lowest, highest or None); floats must be finite
    "seed": (0, None), "frame_batch": (1, None), "fps": (_ABOVE_0, 1000), "start": (0, None),
    "duration": (_ABOVE_0, None),
    "max_frames": (1, None), "frame_limit": (1, None), "num_frames": (1, None), "temperature": (0, None),
    "top_k": (0, None), "top_p": (_ABOVE_0, 1), "cfg": (0, None), "n": (1, None), "image_area": (64, None),
    "batch_size": (1, None), "max_new_tokens": (1, None), "max_images": (1, 8), "window": (1, 63),
    "holdout": (0, None), "min_tokens": (0, None), "min_params": (0, None),
    "holdout_params": (0, None), "bootstrap": (0, None), "cells": (1, None),
    "frames": (1, None), "rings": (0, None),
    "generation": (0, None), "understanding": (0, None), "video": (0, None), "tokenizer_images": (0, None),
    "inpainting": (0, None), "stories": (0, None), "episodes": (1, None), "horizon": (1, None), "history": (0, 1),
    "port": (0, 65535),
    "max_rows": (1, None), "max_queue": (0, None), "timeout": (_ABOVE_0, None), "max_body_mb": (1, 4096),
    "vq_steps": (1, None), "lm_steps": (1, None), "parts": (1, None), "workers": (1, 256), "shard_size": (1, None),
    "vocab_size": (1, None), "codebook_size": (1, None), "min_frequency": (1, None),
}


def _ranged(kind, dest: str):
    low, high = _RANGES[dest]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not np.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        above = low == _ABOVE_0
        if (value <= 0 if above else value < low) or (high is not None and value > high):
            first = "above 0" if above else f">= {low:g}"
            where = first if high is None else f"{first} and <= {high:g}" if above else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} {where}, "
                                             f"got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _leaves(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for sub in subs:
        for child in dict.fromkeys(sub.choices.values()):
            yield from _leaves(child)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the command, the problem, where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _thread_count(text: str) -> str:
    if text != "auto" and not (text.isdigit() and 1 <= int(text) <= 1024):
        raise argparse.ArgumentTypeError(f"expected a number of threads from 1 to 1024, or auto; got {text!r}")
    return text


def _finish(parser: argparse.ArgumentParser) -> None:
    """On every command (the leaves of the subcommand tree): --threads, and the ranges of numbers."""
    for leaf in _leaves(parser):
        words = leaf.prog.split()[1:]
        if words and words[0] in RELEASED_FORM and (words[0] != "vq" or words[-1] in ("encode", "decode",
                                                                                      "reconstruct")):
            form = RELEASED_FORM[words[0]].format(input="INPUT", action=words[-1])
            leaf.epilog = WORLD_HELP + form
        leaf.add_argument("--threads", type=_thread_count, metavar="N",
                          help="CPU threads for PyTorch (default auto: 1 for small models such as the built-in "
                               "ones, every core for large work; also EMU3_THREADS)")
        for action in leaf._actions:
            if action.type in (int, float):
                if action.dest not in _RANGES:
                    raise AssertionError(f"{leaf.prog} {action.option_strings}: no range in cli._RANGES")
                action.type = _ranged(action.type, action.dest)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (one line already printed) or --help; as a status, not an exception
        return e.code if isinstance(e.code, int) else 2
    try:
        # an explicit choice applies at once; auto is refined by commands that know their work (_set_threads)
        threads.configure(float("inf"), args.threads)
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
