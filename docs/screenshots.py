"""Redraw the README's screenshots of the built-in model: docs/report.png (the top of `emu3 report`'s page)
and docs/serve.png (`emu3 serve`'s web page after one prompt and one question).

    pip install -e ".[dev]" && apt-get install chromium   # playwright drives Debian's chromium
    python docs/screenshots.py [--model DIR]

The question is asked about the world's scene of seed 7, saved as a 256x256 PNG; the prompt is the
README's first command. Both pages come from the installed package, so the pictures follow the model.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DOCS = Path(__file__).resolve().parent
PROMPT, QUESTION = "two red circles above a blue square", "how many circles are there?"


def main() -> None:
    from playwright.sync_api import sync_playwright

    from emu3.world.scenes import render, sample_scene

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.harness
    from tests.harness import ServerProcess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the built-in model)")
    args = ap.parse_args()
    model = ["--model", args.model] if args.model else []
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        sys.exit("no chromium on this machine (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        tmp = Path(tmp)
        subprocess.run(["emu3", "report", "-o", str(tmp / "report"), *model], check=True)
        ask = tmp / "ask.png"
        Image.fromarray(render(sample_scene(np.random.default_rng(7)))).resize((256, 256), Image.NEAREST).save(ask)
        with ServerProcess(model) as server:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1700})
                page.goto((tmp / "report" / "index.html").as_uri())
                page.wait_for_load_state("load")
                page.screenshot(path=str(DOCS / "report.png"))

                page = browser.new_page(viewport={"width": 1160, "height": 560})
                page.goto(server.url + "/")
                page.fill("#prompt", PROMPT)
                page.fill("#seed", "0")
                page.click("#go")
                page.wait_for_selector('#image[data-done="1"]', timeout=120_000)
                page.set_input_files("#file", str(ask))
                page.fill("#question", QUESTION)
                page.click("#ask")
                page.wait_for_function("document.getElementById('chatstatus').textContent === 'done'",
                                       timeout=120_000)
                print("answer:", page.inner_text("#answer").strip())
                page.screenshot(path=str(DOCS / "serve.png"))
            finally:
                browser.close()
    print("wrote", DOCS / "report.png", DOCS / "serve.png")


if __name__ == "__main__":
    main()
