"""The science recipes end to end on tiny budgets (slow): the token-order recipe (training runs, held-out
losses, the spiral-in models' inpainting and its figure) and the DPO recipe (candidates at a chosen
guidance scale, several pairs per prompt, the run, the scores before and after)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from emu3.pipeline import Defaults
from emu3.train.grid import GridConfig, prepare_data

pytestmark = pytest.mark.slow


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()  # the recipes hold PyTorch to one thread
    yield
    torch.set_num_threads(n)


def test_the_orders_recipe_trains_scores_and_inpaints(tmp_path, keep_threads):
    from emu3.recipes.orders import TUNED, main

    data = tmp_path / "grid"  # a small shapes world where the recipe looks for a grid's data
    prepare_data(GridConfig(sizes=[{}], tokens=[3072], world={"images": 48, "videos": 6},
                            heldout_world={"images": 12, "videos": 4}), data, progress=False)
    out = tmp_path / "orders"
    main([str(out), "--data", str(data), "--pretrain", "3072", "--tune", "3072", "--eval-records", "4",
          "--inpaint", "2"])
    results = json.loads((out / "results.json").read_text())
    names = {"raster", "weight-1.0", "raster+"} | {f"{o}-{k}" for o in TUNED for k in ("tuned", "scratch")}
    assert set(results) == names
    for name, r in results.items():
        assert all(0 < r[t] < 9 for t in ("t2i", "i2t", "t2v")), name
    for name in ("spiral-tuned", "spiral-scratch"):
        r = results[name]
        assert 0 < r["inner"] < 9 and r["inpainting"]["scenes"] == 2
        assert all(0 <= r["inpainting"][k] <= 1 for k in ("accuracy", "border_only", "tokenizer_ceiling"))
        # exported with the order it was trained in and its data's bare captions as prompts
        d = Defaults.load(out / f"{name}-model")
        assert (d.order, d.positive_suffix, d.negative_prompt) == ("spiral", "", "")
    with Image.open(out / "inpainting.png") as fig:  # 6 scenes x (original, border only, 2 models)
        assert fig.format == "PNG" and fig.width > fig.height / 6 * 3
    before = (out / "results.json").read_text()
    main([str(out), "--data", str(data), "--pretrain", "3072", "--tune", "3072", "--eval-records", "4",
          "--inpaint", "2"])  # finished: nothing is trained or scored again
    assert (out / "results.json").read_text() == before


def test_the_dpo_recipe_pairs_tunes_and_scores(tmp_path, keep_threads):
    from emu3.recipes.dpo import main

    out = tmp_path / "dpo"
    args = [str(out), "--prompts", "1", "--candidates", "4", "--cfg", "1", "--pairs-per-prompt", "2",
            "--eval-prompts", "1", "--epochs", "1"]
    main(args)
    rows = json.loads((out / "candidates.json").read_text())
    assert len(rows) == 6 * 4  # a prompt per category, 4 images each
    scores = json.loads((out / "scores-selection.json").read_text())
    assert scores["cfg"] == 1 and 1 <= scores["counts"]["pairs"] <= 12
    assert len(scores["before"]) == len(scores["after"]) == 3 and all(0 <= x <= 1 for x in scores["after"])
    assert (out / "model" / "config.json").exists()
    with pytest.raises(SystemExit, match="holds candidates drawn with"):  # other settings, same folder
        main([str(out), "--prompts", "1", "--candidates", "4", "--cfg", "2"])
