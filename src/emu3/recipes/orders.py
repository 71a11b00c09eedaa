"""Token orders and vision loss weighting in miniature on the shapes world (the paper's Extended Data
Table 6: other visual token orders fine-tuned from a raster-pretrained model beat the same orders trained
from scratch; and the pretraining stages weigh vision tokens 0.5 in the loss).

Runs, each an ordinary resumable training run under OUT/runs/NAME, on the data of a scaling grid (the
shapes world: `emu3.train.grid.prepare_data`), one model size:
- raster: from scratch in raster order, `--pretrain` tokens (vision weight 0.5, as in pretraining);
- raster+: raster continued for `--tune` more tokens (the control: the same extra compute, no new order);
- ORDER-tuned / ORDER-scratch, for diagonal, block and spiral: from raster's weights, or from scratch, with
  the same `--tune` tokens in that order;
- weight-1.0: as raster but with vision tokens weighing 1.0.
Each is scored by held-out next-token losses (nats per token) in its own order: T2I (the visual codes given
the caption), I2T, T2V, and for the spiral-in order the inner half of each image given its border (what
inpainting asks). The two spiral-in models also inpaint for real (`Emu3.inpaint`, what `emu3 inpaint` runs):
`--inpaint` held-out scenes of the report split with the inside erased, scored by the evaluator's inpainting
check beside the border alone and the vision tokenizer's ceiling (and OUT/inpainting.png: the first scenes).
Writes OUT/results.json and prints a table.

    python -m emu3.recipes.orders OUT [--data GRIDDIR] [--pretrain 1000000] [--tune 250000]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..fsutil import atomic_file
from ..train.grid import TASKS, GridConfig, check_lengths, heldout_loss, init_model, prepare_data, task_samples

SIZE = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 5, "num_attention_heads": 6,
        "num_key_value_heads": 2}
TUNED = ("diagonal", "block", "spiral")


def inner_half(samples: list) -> list:
    """Count only the second half of each sample's counted positions (spiral-in: the centre given the border)."""
    out = []
    for ids, counted in samples:
        where = np.flatnonzero(counted)
        keep = np.zeros_like(counted)
        keep[where[len(where) // 2:]] = True
        out.append((ids, keep))
    return out


def inpainting_figure(models: dict, out: Path, scenes: int = 6, seed: int = 150_000, rings: int = 2,
                      scale: int = 3) -> Path:
    """A PNG of held-out scenes (rows, the first of `eval_inpainting`'s): the original, its border over a
    grey inside, and each model's inpainting (columns, a green or red bar: the evaluator's verdict)."""
    from PIL import Image, ImageDraw

    from ..eval.bench import erased, same_objects
    from ..world.scenes import inventory, render, sample_scene

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(scenes):
        scene = sample_scene(rng)
        image = render(scene)
        cells, marks = [image, None], [None, None]
        for emu in models.values():
            g = emu.inpaint(image, inventory(scene), rings, seed=seed + i)
            cells.append(g.pixels)
            marks.append(same_objects(scene, g.pixels))
        cells[1] = erased(image, g.codes.shape, rings)
        rows.append((cells, marks))
    h, w = rows[0][0][0].shape[:2]
    pad, head = 4, 14
    cols = 2 + len(models)
    sheet = Image.new("RGB", (cols * (w * scale + pad) + pad, head + scenes * (h * scale + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(["original", "border only", *models]):
        draw.text((pad + c * (w * scale + pad), 2), name, fill="black")
    for r, (cells, marks) in enumerate(rows):
        for c, (pixels, ok) in enumerate(zip(cells, marks)):
            x, y = pad + c * (w * scale + pad), head + r * (h * scale + pad)
            sheet.paste(Image.fromarray(pixels).resize((w * scale, h * scale), Image.NEAREST), (x, y))
            if ok is not None:
                draw.rectangle((x, y + h * scale - 3, x + w * scale - 1, y + h * scale - 1),
                               fill=(40, 160, 60) if ok else (200, 40, 40))
    with atomic_file(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--data", help="a scaling grid's folder whose data/ to use (default: build it in OUT)")
    ap.add_argument("--pretrain", type=int, default=1_000_000, help="raster pretraining tokens")
    ap.add_argument("--tune", type=int, default=250_000, help="tokens of each fine-tuning / scratch run")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-records", type=int, default=256, help="held-out records scored per task")
    ap.add_argument("--inpaint", type=int, default=64, help="scenes each spiral-in model inpaints (0: none)")
    args = ap.parse_args(argv)
    from ..checkpoint import load_model, model_folder, vision_folder
    from ..eval.bench import SPLITS, eval_inpainting
    from ..format import Formatter
    from ..pipeline import Emu3
    from ..tokenizer import TextTokenizer
    from ..train import state
    from ..train.config import TrainConfig
    from ..train.trainer import export, train

    torch.set_num_threads(1)
    out = Path(args.out)
    grid = GridConfig(sizes=[SIZE], tokens=[args.pretrain], seq_len=384, batch_size=8)
    data, held, tok = prepare_data(grid, Path(args.data) if args.data else out, progress=True)
    check_lengths(grid, held, tok)
    text = TextTokenizer.from_pretrained(tok)
    init = out / "init"
    init_model(init, text, data, SIZE, 0, 1024)
    per_step = grid.seq_len * grid.batch_size

    def run(name: str, start: Path, tokens: int, **kw) -> Path:
        steps = math.ceil(tokens / per_step)
        cfg = TrainConfig(model=str(start), data=data, seq_len=grid.seq_len, batch_size=grid.batch_size, steps=steps,
                          lr=args.lr, min_lr=args.lr / 10, warmup=min(steps - 1, max(1, steps // 20)),
                          caption_after=0.5,
                          save_every=max(1, steps // 4), keep_last=1, log_every=10, out=str(out / "runs" / name),
                          text_tokenizer=tok, **kw)
        train(cfg, progress=False)
        return out / "runs" / name

    plan = [("raster", init, args.pretrain, {"order": "raster"}),
            ("weight-1.0", init, args.pretrain, {"order": "raster", "vision_weight": 1.0})]
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def score(name: str, folder: Path, order: str) -> None:
        if name in results:
            return
        model = load_model(init, dtype=torch.float32)
        state.load_model_state(state.latest(folder), model)
        fmt = Formatter(text, order)
        n = args.eval_records
        row = {t: heldout_loss(model, task_samples(t, held[t], fmt, n), text.vocab.pad) for t in TASKS}
        if order == "spiral":
            row["inner"] = heldout_loss(model, inner_half(task_samples("t2i", held["t2i"], fmt, n)), text.vocab.pad)
        results[name] = {"order": order, **row}
        with atomic_file(results_path) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
        print(f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)

    for name, start, tokens, kw in plan:
        score(name, run(name, start, tokens, **kw), kw["order"])
    raster_model = out / "raster-model"
    if not (raster_model / "config.json").exists():
        export(out / "runs" / "raster", raster_model)
    score("raster+", run("raster+", raster_model, args.tune, order="raster"), "raster")
    for order in TUNED:
        score(f"{order}-tuned", run(f"{order}-tuned", raster_model, args.tune, order=order), order)
        score(f"{order}-scratch", run(f"{order}-scratch", init, args.tune, order=order), order)
    vision = vision_folder(model_folder(None))  # the grid's data was tokenized with the built-in tokenizer
    spirals = {}
    for name in ("spiral-tuned", "spiral-scratch") if args.inpaint else ():
        folder = out / f"{name}-model"
        if not (folder / "config.json").exists():
            export(out / "runs" / name, folder)
        spirals[name] = emu = Emu3.from_pretrained(folder, vision_folder=vision)
        if "inpainting" not in results[name]:
            results[name]["inpainting"] = eval_inpainting(emu, args.inpaint, SPLITS["report"] + 40_000)
            with atomic_file(results_path) as tmp:
                tmp.write_text(json.dumps(results, indent=2))
    if spirals and not (out / "inpainting.png").exists():
        print(f"wrote {inpainting_figure(spirals, out / 'inpainting.png', seed=SPLITS['report'] + 40_000)}")
    print("| run | order | T2I | I2T | T2V | spiral inner half | inpainting (border only, ceiling) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        inner = f"{r['inner']:.4f}" if "inner" in r else "-"
        ip = r.get("inpainting")
        ip = f"{ip['accuracy']:.3f} ({ip['border_only']:.3f}, {ip['tokenizer_ceiling']:.3f})" if ip else "-"
        print(f"| {name} | {r['order']} | {r['t2i']:.4f} | {r['i2t']:.4f} | {r['t2v']:.4f} | {inner} | {ip} |")


if __name__ == "__main__":
    main()
