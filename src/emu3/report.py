"""`emu3 report -o report/`: one self-contained HTML page (images and videos inlined as data URIs) that
shows what a model does on the shapes world: generated images for prompts of every evaluation
category with the detector's verdict, answers to questions about held-out images, stories written with
their pictures (interleaved), generated and extended videos, tokenizer reconstructions, inpainting (for a
model trained in the spiral-in order), the evaluation table and, given a VLA model, rollouts of the policy
on the table-top task (a success and a failure).

Also `save_interleaved` (`emu3 interleave PROMPT -o DIR`): an interleaved answer as a folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import media
from .eval import bench
from .format import Text
from .fsutil import atomic_dir, atomic_file
from .world.motion import describe, sample_clip
from .world.scenes import inventory, questions, render, sample_scene


def _png(img: np.ndarray, scale: int = 3) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gif(frames: np.ndarray, fps: float = 8.0, scale: int = 3) -> str:
    big = np.stack([np.asarray(Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST))
                    for f in frames])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.gif"
        media.write_video(path, big, fps)
        return "data:image/gif;base64," + base64.b64encode(path.read_bytes()).decode()


def _figure(src: str, caption: str, ok: bool | None = None) -> str:
    mark = "" if ok is None else (' <b class="ok">&#10003;</b>' if ok else ' <b class="no">&#10007;</b>')
    return f'<figure><img src="{src}"><figcaption>{html.escape(caption)}{mark}</figcaption></figure>'


CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:0}.sub{color:#666;margin-top:4px}section{margin-top:28px}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;width:200px}figure img{width:192px;image-rendering:pixelated;
border:1px solid #ccc}figcaption{font-size:13px;margin-top:4px}.ok{color:#1a7f37}.no{color:#c62828}
table{border-collapse:collapse;margin-top:8px}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"""


def save_interleaved(out: str | Path, prompt: str, segments: list) -> Path:
    """Write an interleaved answer (format.Text and pipeline.Picture segments) as a folder, atomically:
    image-K.png for the K-th image (from 1), segments.json (the prompt, then {"type": "text", "text": ...}
    or {"type": "image", "path": "image-K.png", "codes": [h, w]} in order) and index.html (one
    self-contained page: the prompt, then text and images in order). Returns index.html's path."""
    out = Path(out)
    items, body = [{"type": "text", "text": prompt}], [f"<p><b>{html.escape(prompt)}</b></p>"]
    with atomic_dir(out) as tmp:
        k = 0
        for s in segments:
            if isinstance(s, Text):
                items.append({"type": "text", "text": s.text})
                body.append(f"<p>{html.escape(s.text)}</p>")
            else:
                k += 1
                name = f"image-{k}.png"
                Image.fromarray(s.pixels).save(tmp / name)
                items.append({"type": "image", "path": name, "codes": list(s.codes.shape)})
                body.append(_figure(_png(s.pixels), name))
        (tmp / "segments.json").write_text(json.dumps(items, indent=1), encoding="utf-8")
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(prompt)}</title>"
                f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def stories_section(emu, seed: int, n: int = 3) -> str:
    """Held-out stories: the world's first sentence, then what the model wrote, text and pictures, with the
    evaluator's verdict on each step."""
    from .world.build import story

    rng = np.random.default_rng(seed)
    stories = [story(rng) for _ in range(n)]
    answers = emu.generate_interleaved([s[0][0] for s in stories], seed=seed)
    rows = []
    for st, segments in zip(stories, answers):
        steps = bench.story_steps(segments)
        verdict = bench.score_story(bench.first_object(st[0][0]), steps)
        blank = np.full((64, 64, 3), 255, np.uint8)  # a step whose picture the model did not draw
        figs = [_figure(_png(im if im is not None else blank), f"{t or st[0][0]}", ok)
                for (t, im), ok in zip(steps, verdict + [None] * len(steps))]
        rows.append('<div class="grid">' + "".join(figs) + "</div>")
    return ('<section><h2>Stories (interleaved text and images)</h2><p>Given the first sentence of a held-out story, '
            "the model writes the rest, deciding where each picture starts; the mark is the evaluator's verdict on "
            "each step.</p>" + "".join(rows) + "</section>")


def vla_section(policy, seed: int = 200_000, tries: int = 8, most: int = 32) -> str:
    """Closed-loop rollouts of a VLA policy (emu3.vla.Policy) on held-out tables: GIFs of the table view
    for the first success and the first failure, and the success count: `tries` episodes, or more (up
    to `most`) until both a success and a failure have been seen."""
    from .world.table import TableEnv, rollout

    shown: dict[bool, str] = {}
    wins = n = 0
    while n < tries or (len(shown) < 2 and n < most):
        policy.reset()
        ep = rollout(TableEnv(seed + n), policy)
        wins, n = wins + ep.success, n + 1
        if ep.success not in shown:
            what = "success" if ep.success else "failure"
            shown[ep.success] = _figure(_gif(ep.table), f"{what}: {ep.instruction} ({len(ep.actions)} steps)",
                                        ep.success)
    figs = [shown[k] for k in (True, False) if k in shown]
    which = " and ".join(f"the first {w}" for k, w in ((True, "success"), (False, "failure")) if k in shown)
    return (f'<section><h2>Vision-language-action</h2><p>The policy in the loop on held-out tables (seeds {seed}+): '
            f'{wins} of {n} episodes succeeded. {which.capitalize()}, as the table camera '
            f'saw {"them" if len(figs) > 1 else "it"}:</p><div class="grid">{"".join(figs)}</div></section>')


def inpainting_section(emu, rng: np.random.Generator, seed: int, scenes: int = 4, rings: int = 2) -> str:
    """For a model that writes images spiral-in (the only order that can keep a border): held-out scenes,
    their kept border over a grey inside, and the model's inside written from a caption naming every
    object, marked as `emu3 eval` scores it."""
    figs = []
    for i in range(scenes):
        scene = sample_scene(rng)
        image, text = render(scene), inventory(scene)
        g = emu.inpaint(image, text, rings, seed=seed + i)
        figs.append(_figure(_png(image), "original"))
        figs.append(_figure(_png(bench.erased(image, g.codes.shape, rings)), f"kept: the outer {rings} rings of codes"))
        figs.append(_figure(_png(g.pixels), f"model: {text}", bench.same_objects(scene, g.pixels)))
    return ('<section><h2>Inpainting</h2><p>The model keeps the border and writes the inside (spiral-in order); '
            'the mark: the detector finds exactly the scene\'s objects.</p><div class="grid">' + "".join(figs) +
            "</div></section>")


def build_report(emu, out: str, seed: int = 50_000, eval_sizes: dict | None = None, model_name: str = "",
                 vla=None, progress: bool = False) -> Path:
    """Write out/index.html; returns its path. `vla`: an emu3.vla.Policy to show in the loop as well.
    `progress`: a bar over the report's sections on stderr (the evaluation adds its own)."""
    t0 = time.time()
    rng = np.random.default_rng(seed)
    parts = []
    sections = ["text to image", "questions", "stories", "videos", "tokenizer"]
    sections += ["inpainting"] * (emu.defaults.order == "spiral") + ["policy in the loop"] * (vla is not None)
    sections.append("evaluation")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sections), unit="section", dynamic_ncols=True, leave=False)

    def section(name: str) -> None:
        if bar is not None:
            if bar.n or name != sections[0]:
                bar.update(1)
            bar.set_description(f"report: {name}")

    section("text to image")
    prompts = bench.geneval_prompts(2, seed)
    gens = emu.generate_images([p.text for p in prompts], seed=seed)
    figs = [_figure(_png(g.pixels), p.text, bench.score(p, g.pixels)) for p, g in zip(prompts, gens)]
    parts.append('<section><h2>Text to image</h2><p>Prompts from every evaluation category; the mark is the '
                 'detector\'s verdict against the prompt.</p><div class="grid">' + "".join(figs) + "</div></section>")
    section("questions")
    qa = []
    for _ in range(8):
        scene = sample_scene(rng)
        (q, a), = questions(scene, rng, 1)
        answer = emu.chat(render(scene), q)  # the model's max_new_tokens: room to reason
        qa.append(_figure(_png(render(scene)), f"{q}? -> {answer} (truth: {a})", bench.final_answer(answer) == a))
    parts.append('<section><h2>Questions about held-out images</h2><div class="grid">' + "".join(qa) +
                 "</div></section>")
    section("stories")
    parts.append(stories_section(emu, seed))
    section("videos")
    vids = []
    for i in range(3):
        clip = sample_clip(rng)
        frames = clip.render()
        g = emu.extend_video(frames[:4], describe(clip), new_frames=3, seed=seed + i)
        vids.append(_figure(_gif(frames), f"world: {describe(clip)}"))
        vids.append(_figure(_gif(g.pixels), "model: given the first 4 frames"))
    t2v = emu.generate_video(describe(sample_clip(rng)), frames=4, seed=seed)
    vids.append(_figure(_gif(t2v.pixels), f"text to video: {t2v.prompt}"))
    parts.append('<section><h2>Videos</h2><div class="grid">' + "".join(vids) + "</div></section>")
    section("tokenizer")
    recon = []
    for _ in range(4):
        img = render(sample_scene(rng))
        rec = emu.vision.decode_image(emu.vision.encode_image(img))
        from .metrics import psnr

        recon.append(_figure(_png(img), "original"))
        recon.append(_figure(_png(rec), f"through the tokenizer: {psnr(img, rec):.1f} dB"))
    parts.append('<section><h2>Vision tokenizer</h2><div class="grid">' + "".join(recon) + "</div></section>")
    if emu.defaults.order == "spiral":
        section("inpainting")
        parts.append(inpainting_section(emu, rng, seed))
    if vla is not None:
        section("policy in the loop")
        parts.append(vla_section(vla))
    section("evaluation")
    sizes = eval_sizes or {"generation": 8, "understanding": 48, "video": 6, "tokenizer": 64, "inpainting": 8,
                           "stories": 8}
    results = bench.evaluate(emu, **sizes, seed=seed, progress=progress)
    rows = "".join(f"<tr><td>{b}</td><td>{m}</td><td>{v:.3f}</td></tr>" for b, ms in results.items()
                   for m, v in ms.items() if isinstance(v, float))
    parts.append(f"<section><h2>Evaluation</h2><p>{html.escape(str(sizes))} held-out items (emu3 eval runs the "
                 f"full set).</p><table><tr><th>benchmark</th><th>metric</th><th>value</th></tr>{rows}</table>"
                 "</section>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>emu3 report</title><style>{CSS}</style></head>"
            f"<body><h1>emu3 report</h1><p class='sub'>{html.escape(model_name)}; made in {time.time() - t0:.0f} s "
            "by <code>emu3 report</code></p>" + "".join(parts) + "</body></html>")
    if bar is not None:
        bar.close()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "index.html"
