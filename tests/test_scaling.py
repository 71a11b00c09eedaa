"""Scaling-law fits: recovery of a known law, held-out prediction, bootstrap intervals, bad runs files."""

from __future__ import annotations

import numpy as np
import pytest

from emu3 import scaling
from emu3.errors import InputError

TRUE = dict(e=1.69, a=406.4, b=410.7, alpha=0.34, beta=0.28)  # Chinchilla's published law


def synthetic(noise: float = 0.005, seed: int = 0) -> np.ndarray:
    """Points of the law on 5 sizes x 4 token budgets (each a decade or more), with multiplicative noise."""
    rng = np.random.default_rng(seed)
    n = np.logspace(6, 9, 5)
    d = np.logspace(8, 11, 4)
    nn, dd = (x.reshape(-1) for x in np.meshgrid(n, d))
    loss = scaling.law(nn, dd, TRUE["e"], TRUE["a"], TRUE["b"], TRUE["alpha"], TRUE["beta"])
    return np.stack([nn, dd, loss * np.exp(rng.normal(0, noise, len(loss)))], 1)


def test_the_fit_recovers_a_known_law_and_predicts_held_out_runs():
    pytest.importorskip("scipy")
    exact = scaling.fit(synthetic(noise=0.0), bootstrap=0)
    assert abs(exact.alpha - TRUE["alpha"]) < 0.01 and abs(exact.beta - TRUE["beta"]) < 0.01
    assert exact.mape < 1e-3 and exact.r2 > 0.9999
    noisy = scaling.fit(synthetic(), holdout=3, bootstrap=30)
    assert abs(noisy.alpha - TRUE["alpha"]) < 0.08 and abs(noisy.beta - TRUE["beta"]) < 0.08
    assert noisy.points == 17 and noisy.holdout_mape < 0.03 and noisy.r2 > 0.99
    lo, hi = noisy.intervals["beta"]
    assert lo <= noisy.beta <= hi and hi - lo < 0.3


def test_runs_files_are_checked(tmp_path):
    good = tmp_path / "runs.csv"
    rows = ["task,params,tokens,loss"] + [f"t2i,{n:.0f},{d:.0f},{loss}" for n, d, loss in synthetic()]
    good.write_text("\n".join(rows) + "\n")
    assert set(scaling.read_runs(good)) == {"t2i"} and scaling.read_runs(good)["t2i"].shape == (20, 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("task,params,loss\nt2i,1,2\n")
    with pytest.raises(InputError, match="missing column.*tokens"):
        scaling.read_runs(bad)
    bad.write_text("task,params,tokens,loss\nt2i,1e6,-5,2\n")
    with pytest.raises(InputError, match="line 2: .*positive"):
        scaling.read_runs(bad)
    bad.write_text("task,params,tokens,loss\nt2i,1e6,abc,2\n")
    with pytest.raises(InputError, match="line 2: .*numbers"):
        scaling.read_runs(bad)
    with pytest.raises(InputError, match="at least 5 runs"):
        scaling.fit(synthetic()[:6], holdout=2)
    with pytest.raises(InputError, match="no runs of task 'i2t'"):
        scaling.fit_runs(good, task="i2t")


def test_the_fit_command(tmp_path, capsys):
    pytest.importorskip("scipy")
    import json

    from emu3.cli import main

    runs = tmp_path / "runs.csv"
    rows = "".join(f"t2i,{n:.0f},{d:.0f},{loss}\n" for n, d, loss in synthetic())
    runs.write_text("task,params,tokens,loss\n" + rows)
    assert main(["scaling", "fit", str(runs), "--bootstrap", "0", "--holdout", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # one task: the fit's object itself
    assert {"E", "A", "B", "alpha", "beta", "r2", "mape"} <= set(out) and abs(out["alpha"] - TRUE["alpha"]) < 0.1
    assert out["task"] == "t2i"
    runs.write_text(runs.read_text() + rows.replace("t2i,", "t2v,"))  # several: task -> fit
    assert main(["scaling", "fit", str(runs), "--bootstrap", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"t2i", "t2v"} and out["t2v"]["alpha"] == pytest.approx(out["t2i"]["alpha"])
    assert main(["scaling", "fit", str(tmp_path / "none.csv")]) == 2
    assert "no such runs file" in capsys.readouterr().err


def test_runs_below_a_budget_or_size_are_left_out(tmp_path, capsys):
    """--min-tokens / --min-params: the runs kept for the fit, and a clear error when too few remain."""
    from emu3.cli import main

    runs = tmp_path / "runs.csv"
    points = synthetic()
    early = points[points[:, 1] == points[:, 1].min()].copy()
    early[:, 1] /= 10
    early[:, 2] = np.log(1024)  # a budget before the power-law regime: every size still near uniform
    runs.write_text("task,params,tokens,loss\n" + "".join(f"t2i,{n:.0f},{d:.0f},{x}\n"
                                                          for n, d, x in np.concatenate([points, early])))
    kept = scaling.select_runs(runs, min_tokens=points[:, 1].min())["t2i"]
    assert len(kept) == len(points) and np.allclose(kept, points, rtol=1e-6)
    assert len(scaling.select_runs(runs, min_params=points[:, 0].max())["t2i"]) == 5  # one size, 5 budgets
    with pytest.raises(InputError, match="keeps 1 runs with params >= 1e\\+09 and tokens >= 1e\\+11"):
        scaling.select_runs(runs, min_params=1e9, min_tokens=1e11)
    assert main(["scaling", "fit", str(runs), "--bootstrap", "0", "--min-tokens", "1e12"]) == 2
    assert "keeps 0 runs" in capsys.readouterr().err
    # the paper's test: the smaller models' fit predicts the largest model's runs
    assert main(["scaling", "fit", str(runs), "--bootstrap", "0", "--min-tokens", str(points[:, 1].min()),
                 "--holdout-params", str(points[:, 0].max())]) == 0
    out = capsys.readouterr().out
    assert "| 16 |" in out and out.count("t2i held out: N=1,000,000,000") == 4
    f = scaling.fit(points, bootstrap=0, holdout_params=points[:, 0].max())
    assert f.points == 16 and len(f.held_out) == 4 and f.holdout_mape < 0.03
    assert all(abs(pred / obs - 1) < 0.05 for _, _, obs, pred in f.held_out)
    with pytest.raises(InputError, match="not both"):
        scaling.fit(points, holdout=2, holdout_params=1e9)
    with pytest.raises(InputError, match="from 0 to the 20 there are, got 25"):
        scaling.fit(points, holdout=25)


def fast_fits(monkeypatch):
    """One L-BFGS start instead of Hoffmann et al.'s 4,500: the plot tests fit in milliseconds."""
    monkeypatch.setattr(scaling, "GRID", tuple(np.array([x]) for x in (0.5, 0.5, 0.5, 5.0, 5.0)))


def runs_csv(path, tasks=("t2i", "i2t")):
    rows = "".join(f"{t},{n:.0f},{d:.0f},{loss}\n" for i, t in enumerate(tasks) for n, d, loss in synthetic(seed=i))
    path.write_text("task,params,tokens,loss\n" + rows)
    return path


def test_the_plot_draws_each_task_with_its_held_out_runs(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    from PIL import Image

    fast_fits(monkeypatch)
    runs = runs_csv(tmp_path / "runs.csv")
    out = scaling.plot_runs(runs, tmp_path / "fig.png", holdout=2)
    assert out == tmp_path / "fig.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and 1000 <= im.width <= 3000 and 600 <= im.height <= 3000  # two rows
        assert len(set(im.convert("RGB").resize((64, 64)).getdata())) > 10  # not blank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "runs.csv"]  # no temporary left
    # given fits are drawn as they are (no refit); one task is one row
    given = {"t2i": scaling.Fit(TRUE["e"], TRUE["a"], TRUE["b"], TRUE["alpha"], TRUE["beta"], 1.0, 0.0, 20)}
    monkeypatch.setattr(scaling, "fit", lambda *a, **k: pytest.fail("refitted a given fit"))
    svg = scaling.plot_runs(runs, tmp_path / "one.svg", task="t2i", fits=given)
    assert svg.read_text().lstrip().startswith("<?xml") and "alpha = 0.340" in svg.read_text()


def test_the_plot_command_and_bad_outputs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    import sys

    from emu3.cli import main

    fast_fits(monkeypatch)
    runs = runs_csv(tmp_path / "runs.csv", tasks=("t2i",))
    assert main(["scaling", "plot", str(runs), "-o", str(tmp_path / "fig.png"), "--holdout", "2"]) == 0
    assert f"wrote {tmp_path / 'fig.png'}" in capsys.readouterr().out
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match=r"\.png, \.pdf, \.svg"):
        scaling.plot_runs(runs, tmp_path / "fig.jpg")
    assert main(["scaling", "plot", str(runs), "-o", str(tmp_path / "fig.txt")]) == 2
    assert ".png, .pdf, .svg" in capsys.readouterr().err and not (tmp_path / "fig.txt").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(InputError, match=r'pip install "emu3\[plot\]"'):
        scaling.plot_runs(runs, tmp_path / "fig.png")
