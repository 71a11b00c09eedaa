"""Training: schedule, config errors, learning, exact resume after SIGKILL, non-finite steps,
checkpoint retention, DPO, export, FSDP2/DDP equal to one process."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from emu3.checkpoint import load_model
from emu3.errors import InputError
from emu3.recipes import STAGES as RECIPE_STAGES
from emu3.recipes import all_stages
from emu3.train import state
from emu3.train.config import STAGES, TrainConfig, make_config
from emu3.train.loss import dpo_loss, sequence_logprobs
from emu3.train.parallelize import has_cxx_compiler
from emu3.train.trainer import NonFiniteError, export, lr_at, train


def run_config(token_dataset, dataset_inputs, out, **kw):
    base = dict(data=str(token_dataset), text_tokenizer=str(dataset_inputs / "tok"), out=str(out), seq_len=256,
                batch_size=2, steps=8, warmup=2, save_every=4, dropout=0.0)
    return make_config("tiny-stage1", {**base, **kw})


def losses(run):
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_schedule_warmup_cosine_anneal():
    cfg = TrainConfig(data=["x"], steps=100, warmup=10, anneal=20, lr=1.0, min_lr=0.1)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:80], lrs[10:80]))  # cosine decreasing
    assert lrs[79] == pytest.approx(0.1, abs=1e-3) and lrs[99] == pytest.approx(0.0)


def test_config_errors_name_the_problem():
    with pytest.raises(InputError, match="unknown training preset 'stage9'"):
        make_config("stage9")
    with pytest.raises(InputError, match="unknown config key 'learning_rate'; valid keys:"):
        make_config("tiny-stage1", ["learning_rate=1"])
    with pytest.raises(InputError, match="steps='many': expected int"):
        make_config("tiny-stage1", ["steps=many"])
    with pytest.raises(InputError, match="no training data"):
        make_config("tiny-stage1").validate()
    with pytest.raises(InputError, match="needs several processes"):
        make_config("tiny-stage1", ["data=x", "parallel=fsdp"]).validate(world=1)
    with pytest.raises(InputError, match="parallel=none with 4 processes"):
        make_config("tiny-stage1", ["data=x", "parallel=none"]).validate(world=4)
    with pytest.raises(InputError, match="keep_last must be >= 1"):
        make_config("tiny-stage1", ["data=x", "keep_last=0"]).validate()
    for name in STAGES:  # every preset is a valid config once given data
        make_config(name, ["data=x"]).validate()
    for name in RECIPE_STAGES:  # the recipes' presets too, which the paper's list leaves out
        assert name not in STAGES
        make_config(name, ["data=x"], stages=all_stages()).validate()
    with pytest.raises(InputError, match="unknown training preset 'demo-7'"):
        make_config("demo-7")


def test_impossible_context_fails_at_start(token_dataset, dataset_inputs, tmp_path):
    with pytest.raises(InputError, match="seq_len 8192 is longer than the model's context of 4096"):
        train(run_config(token_dataset, dataset_inputs, tmp_path / "r", seq_len=8192), progress=False)


def test_training_learns(token_dataset, dataset_inputs, tmp_path):
    out = train(run_config(token_dataset, dataset_inputs, tmp_path / "r", steps=40, lr=3e-3, min_lr=3e-4,
                           save_every=40), progress=False)
    curve = losses(tmp_path / "r")
    assert len(curve) == 40 and curve[-1] < curve[0] - 1.0, (curve[0], curve[-1])
    assert out["tokens"] > 0 and (tmp_path / "r" / "ckpt-00000040" / "COMMITTED").exists()
    pytest.importorskip("tensorboard")
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))


def _train_process(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "emu3.cli", "train", "tiny-stage1", *args, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_exact_resume_after_sigkill(token_dataset, dataset_inputs, tmp_path):
    """N steps straight == K steps + SIGKILL + resume + the rest, loss by loss (dropout on)."""
    args = [f"data={token_dataset}", f"text_tokenizer={dataset_inputs / 'tok'}", "seq_len=256", "batch_size=4",
            "steps=40", "warmup=3", "save_every=10", "dropout=0.1", "grad_accum=2"]
    p = _train_process(args + [f"out={tmp_path / 'straight'}"])
    assert p.wait() == 0, p.stderr.read()
    killed = _train_process(args + [f"out={tmp_path / 'killed'}"])
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "ckpt-00000020" / "COMMITTED").exists():
        assert killed.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert state.latest(tmp_path / "killed").name in ("ckpt-00000020", "ckpt-00000030")
    resumed = _train_process(args + [f"out={tmp_path / 'killed'}"])
    assert resumed.wait() == 0, resumed.stderr.read()
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_non_finite_steps_are_skipped_then_stop(token_dataset, dataset_inputs, tmp_path, monkeypatch):
    from emu3.model import Emu3LM

    real = Emu3LM.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] in (3, 4) else out  # micro-batches of steps 3 and 4

    monkeypatch.setattr(Emu3LM, "forward", poisoned)
    train(run_config(token_dataset, dataset_inputs, tmp_path / "r", steps=6, save_every=6), progress=False)
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["skipped"]) for r in rows] == [0, 0, 1, 1, 0, 0]
    assert math.isnan(float(rows[2]["loss"])) and math.isfinite(float(rows[5]["loss"]))

    calls["n"] = 0
    monkeypatch.setattr(Emu3LM, "forward", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        train(run_config(token_dataset, dataset_inputs, tmp_path / "r2", steps=6, max_nonfinite=2), progress=False)
    assert state.latest(tmp_path / "r2") is None  # nothing was saved from the broken run


def test_checkpoint_retention_and_incomplete_saves(token_dataset, dataset_inputs, tmp_path):
    run = tmp_path / "r"
    train(run_config(token_dataset, dataset_inputs, run, steps=8, save_every=2, keep_last=2), progress=False)
    assert [p.name for p in state.checkpoints(run)] == ["ckpt-00000006", "ckpt-00000008"]
    (run / "ckpt-00000010" / "state").mkdir(parents=True)  # killed before COMMITTED
    (run / ".tmp-ckpt-00000012").mkdir()  # killed before the rename
    assert state.latest(run).name == "ckpt-00000008"
    train(run_config(token_dataset, dataset_inputs, run, steps=10, save_every=2, keep_last=2), progress=False)
    assert not (run / ".tmp-ckpt-00000012").exists()
    assert [p.name for p in state.checkpoints(run)] == ["ckpt-00000008", "ckpt-00000010"]


def test_dpo_loss_by_hand():
    # margin = (-10 + 11) - (-12 + 11) = 2; beta 0.5 -> -log sigmoid(1) = log(1 + e^-1) = 0.313262
    loss = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)


def test_sequence_logprobs_by_hand(small_tokenizer):
    from emu3.model import Emu3LM, model_config

    model = Emu3LM(model_config("tiny", small_tokenizer.vocab, attention_dropout=0.0)).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 7, 8, small_tokenizer.vocab.pad]])
    mask = torch.tensor([[False, True, True, False, False]])  # positions 1 and 2 predict ids 7 and 8
    with torch.no_grad():
        total, count = sequence_logprobs(model, ids, mask)
        logp = torch.log_softmax(model(ids), -1)[0]
    assert count.item() == 2
    assert total.item() == pytest.approx((logp[1, 7] + logp[2, 8]).item(), abs=1e-5)


def test_dpo_training_prefers_the_chosen(token_dataset, dataset_inputs, tmp_path):
    from emu3.data.loader import PairLoader, pair_batch

    cfg = make_config("tiny-dpo", dict(data=str(token_dataset), text_tokenizer=str(dataset_inputs / "tok"),
                                       out=str(tmp_path / "dpo"), steps=15, lr=1e-3, min_lr=1e-4, save_every=15))
    train(cfg, progress=False)
    ref = np.load(tmp_path / "dpo" / "dpo_reference.npy")  # computed once, from the starting model
    export(tmp_path / "dpo", tmp_path / "m")
    model = load_model(tmp_path / "m")
    pairs = PairLoader(str(token_dataset), model.config.pad_token_id, 1)
    b = pair_batch(pairs.ds, pairs.indices.tolist(), model.config.pad_token_id)
    with torch.no_grad():
        pc, _ = sequence_logprobs(model, b.chosen, b.chosen_mask)
        pr, _ = sequence_logprobs(model, b.rejected, b.rejected_mask)
    before = ref[pairs.indices, 0] - ref[pairs.indices, 1]
    assert ((pc - pr).numpy() > before).all()  # the policy moved towards the chosen sequences


def test_export_loads_in_emu3_and_transformers(token_dataset, dataset_inputs, tmp_path):
    transformers = pytest.importorskip("transformers")
    train(run_config(token_dataset, dataset_inputs, tmp_path / "r", steps=4, save_every=4,
                     vision_tokenizer=str(dataset_inputs / "vq")), progress=False)
    export(tmp_path / "r", tmp_path / "m")
    ours = load_model(tmp_path / "m")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-4)
    assert (tmp_path / "m" / "vision_tokenizer" / "model.safetensors").exists()
    assert (tmp_path / "m" / "emu3_defaults.json").exists()
    export(tmp_path / "r", tmp_path / "hf", layout="transformers")
    ref = transformers.Emu3ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, ours(ids), rtol=0, atol=1e-4)


def test_token_order_reaches_training_and_the_export(token_dataset, dataset_inputs, tmp_path):
    """order=spiral changes the sequences the model is trained on (same seed and data, another first
    loss), is written into the export's defaults, and is what a fine-tune from that export inherits."""
    from emu3.checkpoint import read_json
    from emu3.pipeline import Emu3

    first = {}
    for name, order in (("raster", "raster"), ("again", "auto"), ("spiral", "spiral")):
        train(run_config(token_dataset, dataset_inputs, tmp_path / name, steps=2, warmup=1, save_every=2, order=order,
                         vision_tokenizer=str(dataset_inputs / "vq")), progress=False)
        first[name] = losses(tmp_path / name)[0]
    assert first["raster"] == first["again"] and first["spiral"] != first["raster"]
    export(tmp_path / "spiral", tmp_path / "m")
    assert read_json(tmp_path / "m" / "emu3_defaults.json")["order"] == "spiral"
    export(tmp_path / "raster", tmp_path / "r")
    assert "order" not in read_json(tmp_path / "r" / "emu3_defaults.json")
    tuned = run_config(token_dataset, dataset_inputs, tmp_path / "ft", model=str(tmp_path / "m"))
    assert tuned.order == "auto" and tuned.resolved_order() == "spiral"
    emu = Emu3.from_pretrained(tmp_path / "m")
    assert emu.defaults.order == "spiral"
    image = np.full((32, 32, 3), 200, np.uint8)
    assert emu.inpaint(image, "a circle", rings=1, seed=0).codes.shape == emu.vision.encode_image(image).shape
    with pytest.raises(InputError, match="spiral-in token order; this model was trained in 'raster' order"):
        Emu3.from_pretrained(tmp_path / "r").inpaint(image, "a circle", rings=1)
    with pytest.raises(InputError, match="order is auto or one of raster"):
        run_config(token_dataset, dataset_inputs, tmp_path / "x", order="zigzag").validate()


def test_bf16_autocast_tracks_fp32(token_dataset, dataset_inputs, tmp_path):
    """The fast path (bf16 autocast, fp32 weights and optimizer) against its fp32 twin: same losses to
    about 1e-3 over a few steps; and "auto" on a CPU follows its bf16 instructions."""
    from emu3.train.trainer import use_bf16

    for b in ("off", "on"):
        train(run_config(token_dataset, dataset_inputs, tmp_path / b, steps=6, bf16=b), progress=False)
    np.testing.assert_allclose(losses(tmp_path / "on"), losses(tmp_path / "off"), rtol=2e-3)
    assert losses(tmp_path / "on") != losses(tmp_path / "off")  # it did run in bf16
    cpu = torch.device("cpu")
    for flags, native in (("fpu sse avx2 avx512f", False), ("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert use_bf16("auto", cpu, tmp_path / "cpuinfo") is native
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert use_bf16("auto", cpu, tmp_path / "arm") and not use_bf16("auto", cpu, tmp_path / "missing")
    assert use_bf16("on", cpu) and not use_bf16("off", cpu)


def _torchrun(args, world=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "-m",
                        "emu3.cli", "train", "tiny-stage1", *args, "--quiet"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_processes_equal_one_on_the_same_global_batch(token_dataset, dataset_inputs, tmp_path, parallel):
    common = [f"data={token_dataset}", f"text_tokenizer={dataset_inputs / 'tok'}", "seq_len=256", "steps=6",
              "warmup=2", "save_every=3", "dropout=0", "bf16=off"]  # fp32: the comparison is to 1e-5
    p = _train_process(common + [f"out={tmp_path / 'one'}", "batch_size=4"])
    assert p.wait() == 0, p.stderr.read()
    _torchrun(common + [f"out={tmp_path / 'two'}", "batch_size=2", f"parallel={parallel}"])
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    # and the sharded checkpoint exports to the same weights as a single-process one would load
    export(tmp_path / "two", tmp_path / "m2")
    export(tmp_path / "one", tmp_path / "m1")
    ids = torch.randint(0, 300, (1, 9))
    torch.testing.assert_close(load_model(tmp_path / "m2")(ids), load_model(tmp_path / "m1")(ids), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.skipif(not has_cxx_compiler(), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_layers_track_eager(token_dataset, dataset_inputs, tmp_path):
    """compile=on (each decoder layer through torch.compile) against its eager twin: same losses to float
    rounding, and a checkpoint with the same names that resumes in eager mode."""
    import torch._dynamo

    for c in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        train(run_config(token_dataset, dataset_inputs, tmp_path / str(c), steps=4, bf16="off", compile=c),
              progress=False)
        assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) is c  # compiled only when asked
    np.testing.assert_allclose(losses(tmp_path / "True"), losses(tmp_path / "False"), rtol=1e-4)
    for c in (False, True):
        export(tmp_path / str(c), tmp_path / f"m{c}")
    a, b = (load_model(tmp_path / f"m{c}", dtype=torch.float32).state_dict() for c in (False, True))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)  # Adam: ulps of gradient move weights
    train(run_config(token_dataset, dataset_inputs, tmp_path / "True", steps=6, bf16="off"), progress=False)
    assert len(losses(tmp_path / "True")) == 6


def test_compile_without_a_compiler_is_a_clear_error(monkeypatch):
    from emu3.model import Emu3LM, model_config
    from emu3.train.parallelize import parallelize

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(InputError, match="needs a C[+][+] compiler"):
        parallelize(Emu3LM(model_config("tiny")), "none", torch.device("cpu"), compile=True)


def test_train_export_generate_chat_with_no_extra_flags(dataset_inputs, tmp_path, capsys):
    """The path a new user takes: tokenize, train a preset from scratch, export, then generate and chat
    with the export alone. The export is a complete model folder: the vision tokenizer the data was
    tokenized with, and the data's image size (the tiny preset's own is the released 720x720, which would
    not fit its 4,096-token context)."""
    from emu3.cli import main
    from emu3.pipeline import Emu3

    data, run, model = tmp_path / "data", tmp_path / "run", tmp_path / "model"
    assert main(["tokenize-dataset", str(dataset_inputs / "imgs"), "--text-tokenizer", str(dataset_inputs / "tok"),
                 "--tokenizer", str(dataset_inputs / "vq"), "-o", str(data), "--quiet"]) == 0
    assert main(["train", "tiny-stage1", f"data={data}", f"text_tokenizer={dataset_inputs / 'tok'}", f"out={run}",
                 "steps=2", "warmup=1", "seq_len=256", "batch_size=2", "--quiet"]) == 0
    assert main(["export", str(run), "-o", str(model)]) == 0
    assert (model / "vision_tokenizer" / "model.safetensors").exists()
    emu = Emu3.from_pretrained(model)
    assert emu.grid() == (8, 8)  # 32x32 pictures through a 4x tokenizer, as in the data
    capsys.readouterr()
    assert main(["generate", "a green triangle", "--model", str(model), "-o", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert "32x32" in capsys.readouterr().out
    assert main(["chat", "--image", str(tmp_path / "g.png"), "what is it?", "--model", str(model)]) == 0
    # the transformers layout from the CLI, with the tokenizer the run recorded (no internal argument names)
    assert main(["export", str(run), "-o", str(tmp_path / "hf"), "--layout", "transformers"]) == 0
    assert Emu3.from_pretrained(tmp_path / "hf").grid() == (8, 8)
    # rerunning the finished run trains nothing, says where it resumed, and reports the last loss it logged
    assert main(["train", "tiny-stage1", f"data={data}", f"text_tokenizer={dataset_inputs / 'tok'}", f"out={run}",
                 "steps=2", "warmup=1", "seq_len=256", "batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "already finished" in out and "nan" not in out


def test_dpo_recipe_pairs_a_correct_image_with_an_incorrect_one_of_the_same_prompt(tmp_path):
    """The DPO experiment's preferences (emu3.recipes.dpo): only prompts with both a correct and an incorrect
    candidate give pairs, the correct one chosen; the dataset is what the DPO loader reads."""
    from emu3.data.loader import PairLoader
    from emu3.recipes.dpo import preferences

    rows = [["a red circle", "single_object", True, [1, 2, 3], [10, 11]],
            ["a red circle", "single_object", False, [1, 2, 3], [12, 13]],
            ["a red circle", "single_object", False, [1, 2, 3], [14, 15]],
            ["two squares", "counting", False, [4, 5], [16]],  # no correct image: no pair
            ["a blue square", "colors", True, [6], [17]]]  # no incorrect image: no pair
    counts = preferences(rows, tmp_path, {"text_size": 100, "codebook_size": 16})
    assert counts == {"prompts": 3, "images": 5, "correct": 2, "pairs": 1}
    loader = PairLoader(str(tmp_path / "preferences"), pad=0, batch_size=1)
    b = loader.next_batch()
    assert b.chosen[0].tolist() == [1, 2, 3, 10, 11] and b.rejected[0].tolist() == [1, 2, 3, 12, 13]
    # more pairs per prompt: disjoint pairs, as many as the scarcer side allows
    rows.insert(1, ["a red circle", "single_object", True, [1, 2, 3], [18]])
    counts = preferences(rows, tmp_path / "more", {"text_size": 100, "codebook_size": 16}, pairs_per_prompt=4)
    assert counts["pairs"] == 2
    b = PairLoader(str(tmp_path / "more" / "preferences"), pad=0, batch_size=2).next_batch()
    assert sorted(b.chosen[:, 3].tolist()) == [10, 18] and sorted(b.rejected[:, 3].tolist()) == [12, 14]
