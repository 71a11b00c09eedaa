"""Scaling grids (`emu3 scaling run`): a grid of cells on the shapes world, runs.csv, a killed grid that
resumes its half-trained cell to the same result, shared grids, and grid files with mistakes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from emu3.cli import main
from emu3.errors import InputError
from emu3.train import grid

SIZES = [dict(hidden_size=16, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
         dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)]
PER_STEP = 384 * 2


def write_grid(path, tokens, **extra):
    cfg = dict(sizes=SIZES, tokens=tokens, world={"images": 48, "videos": 6}, heldout_world={"images": 12, "videos": 4},
               eval_records=8, seq_len=384, batch_size=2, **extra)
    path.write_text(json.dumps(cfg))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_grid_trains_every_cell_and_writes_runs_csv(tmp_path, capsys):
    g = write_grid(tmp_path / "grid.json", [PER_STEP * 2, PER_STEP * 4])
    assert main(["scaling", "run", str(g), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert "4 of 4 cells done" in capsys.readouterr().out
    rows = read_csv(tmp_path / "out" / "runs.csv")
    assert len(rows) == 4 * 3 and {r["task"] for r in rows} == {"t2i", "i2t", "t2v"}
    params = sorted({int(r["params"]) for r in rows})
    assert len(params) == 2 and {int(r["tokens"]) for r in rows} == {PER_STEP * 2, PER_STEP * 4}
    result = json.loads((tmp_path / "out" / "cells" / f"s0-d{PER_STEP * 2}" / "result.json").read_text())
    assert result["steps"] == 2 and result["params"] == params[0] and result["resumed_from"] is None
    # N leaves out embeddings and head: a 1-layer width-16 decoder (q, k, v, o; gate, up, down; 2 norms) + final norm
    d, ff, kv = 16, 48, 8
    assert params[0] == d * d + 2 * d * kv + d * d + 3 * d * ff + 2 * d + d
    for r in rows:  # an untrained model scores about ln(vocabulary); these learnt a little, nothing is absurd
        assert 0 < float(r["loss"]) < 9
    # the models draw images of the data's size (8x8 codes of 8x8 pixels), not the released 720x720
    assert json.loads((tmp_path / "out" / "init" / "s0" / "config.json").read_text())["image_area"] == 64 * 64
    # and a cell exported as a model prompts with its data's bare captions, not the released decoration and
    # negative prompt it never read
    from emu3.pipeline import Defaults
    from emu3.train.trainer import export

    export(tmp_path / "out" / "cells" / f"s0-d{PER_STEP * 2}" / "run", tmp_path / "model")
    d = Defaults.load(tmp_path / "model")
    assert (d.positive_suffix, d.negative_prompt, d.order) == ("", "", "raster")
    # a finished grid trains nothing again, and the fit reads what it wrote
    assert main(["scaling", "run", str(g), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert read_csv(tmp_path / "out" / "runs.csv") == rows


def test_a_killed_grid_resumes_its_half_trained_cell(tmp_path):
    """SIGKILL the grid once the long cell has its first checkpoint; the rerun resumes that checkpoint and
    ends with the held-out losses of a grid that was never interrupted."""
    long = PER_STEP * 24
    g = write_grid(tmp_path / "grid.json", [PER_STEP * 2, long], train={"save_every": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "emu3.cli", "scaling", "run", str(g), "-o", str(tmp_path / "killed"), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "killed" / "cells" / f"s1-d{long}" / "run"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(run.glob("ckpt-*/COMMITTED")):
        time.sleep(0.01)
    assert proc.poll() is None, f"the grid ended before the long cell saved a checkpoint: {proc.stderr.read()[-2000:]}"
    proc.kill()
    proc.wait()
    assert not (run.parent / "result.json").exists()
    assert main(["scaling", "run", str(g), "-o", str(tmp_path / "killed"), "--quiet"]) == 0
    resumed = json.loads((run.parent / "result.json").read_text())
    assert resumed["resumed_from"] is not None and resumed["resumed_from"] != f"ckpt-{24:08d}"
    assert main(["scaling", "run", str(g), "-o", str(tmp_path / "whole"), "--quiet"]) == 0
    whole = json.loads((tmp_path / "whole" / "cells" / f"s1-d{long}" / "result.json").read_text())
    assert whole["resumed_from"] is None
    for task, loss in whole["loss"].items():
        assert resumed["loss"][task] == pytest.approx(loss, rel=1e-5)


def test_cells_are_claimed_once_and_a_dead_claim_is_taken_over(tmp_path):
    cell = tmp_path / "cell"
    cell.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (cell / "CLAIM").write_text(json.dumps({"host": os.uname().nodename, "pid": other.pid}))
        assert not grid._claim(cell)  # a live process holds it
    finally:
        other.kill()
        other.wait()
    assert grid._claim(cell)  # its process is gone
    assert json.loads((cell / "CLAIM").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("change, message", [
    ({"sizes": []}, "'sizes' is a non-empty list"),
    ({"sizes": [{"width": 8}]}, "size 0 must be an object with at least hidden_size"),
    ({"sizes": [{"hidden_size": 8, "depth": 2}]}, "unknown key(s) depth"),
    ({"tokens": [10]}, "'tokens' is a list of budgets of at least one batch"),
    ({"data": ["x"]}, "give both 'data' and 'heldout'"),
    ({"steps": 3}, "unknown key(s) steps"),
])
def test_grid_files_with_mistakes_are_named(tmp_path, change, message):
    cfg = {"sizes": SIZES, "tokens": [PER_STEP], "seq_len": 384, "batch_size": 2, **change}
    (tmp_path / "g.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid.GridConfig.from_json(tmp_path / "g.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not JSON"):
        grid.GridConfig.from_json(tmp_path / "bad.json")


def test_a_task_whose_samples_do_not_fit_a_row_is_refused(tmp_path):
    """The loader skips documents longer than a row: with rows of 320 the shapes world's clips (about 334
    tokens) would never be trained, yet scored."""
    g = write_grid(tmp_path / "grid.json", [PER_STEP])
    cfg = json.loads(g.read_text())
    g.write_text(json.dumps({**cfg, "seq_len": 320}))
    with pytest.raises(InputError, match=r"t2v samples are up to \d+ tokens, longer than seq_len 320"):
        grid.run_grid(g, tmp_path / "out", progress=False)


def test_a_folder_keeps_the_settings_it_was_trained_with(tmp_path):
    g = write_grid(tmp_path / "grid.json", [PER_STEP])
    assert main(["scaling", "run", str(g), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    write_grid(g, [PER_STEP], lr=1e-2)
    with pytest.raises(InputError, match="other settings"):
        grid.run_grid(g, tmp_path / "out", progress=False)
