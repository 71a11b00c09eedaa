"""The table-top manipulation task: layout, physics, views, the expert and demonstrations."""

from __future__ import annotations

import json
import math

import numpy as np

from emu3.world.scenes import Shape
from emu3.world.table import GRIP_R, PUSH_DIST, SIZE, WRIST, TableEnv, Target, Task, expert, record, rollout


def bare(shapes, targets=(), g=(32.0, 32.0)) -> TableEnv:
    env = TableEnv(0)
    env.shapes, env.targets = list(shapes), list(targets)
    env.gx, env.gy, env.closed, env.holding = g[0], g[1], False, None
    return env


def test_tables_are_seeded_and_well_formed():
    a, b = TableEnv(3), TableEnv(3)
    assert a.instruction == b.instruction and all(np.array_equal(x, y) for x, y in zip(a.render(), b.render()))
    kinds = set()
    for seed in range(100):
        env = TableEnv(seed)
        kinds.add(env.task.kind)
        assert len({(s.color, s.kind) for s in env.shapes}) == len(env.shapes)  # the instruction is unambiguous
        for i, s in enumerate(env.shapes):
            assert s.r + 1 <= s.x <= SIZE - 1 - s.r and s.r + 1 <= s.y <= SIZE - 1 - s.r
            assert all(math.hypot(s.x - o.x, s.y - o.y) > s.r + o.r for o in env.shapes[i + 1:])
        assert not env.success()
    assert kinds == {"place", "push"}


def test_grasp_carry_release_and_push():
    env = bare([Shape("square", "red", 20, 20, 6), Shape("circle", "blue", 44, 44, 6)], [Target("green", 40, 20)],
               g=(24, 24))
    env.task = Task("place", 0, target=0, start=(20, 20))
    env.step([0, 0, 1])  # within the half-size of the square's centre: grasped
    assert env.holding == 0
    for _ in range(6):
        env.step([1, -0.5, 1])
    s = env.shapes[0]
    assert (s.x, s.y) == (env.gx, env.gy)  # carried
    env.step([0, 0, -1])
    assert env.holding is None and not env.closed
    env.step([0, 0, 1])  # closing far from any centre grasps nothing
    env.gx, env.gy = 44 - 6 - GRIP_R - 1, 44.0
    env.holding = None
    env.step([1, 0, 1])  # a fist moving into the circle pushes it along the contact normal
    blue = env.shapes[1]
    assert blue.x > 44 and abs(blue.y - 44) < 1e-9 and math.hypot(blue.x - env.gx, blue.y - env.gy) >= 6 + GRIP_R - 1e-9
    env.step([0, 0, -1])
    before = (blue.x, blue.y)
    env.step([1, 0, -1])  # an open gripper hovers over shapes
    assert (blue.x, blue.y) == before


def test_success_conditions():
    env = bare([Shape("circle", "red", 20, 30, 6)], [Target("blue", 40, 30)])
    env.task = Task("push", 0, side="right", start=(20, 30))
    env.shapes[0].x = 20 + PUSH_DIST - 0.5
    assert not env.success()
    env.shapes[0].x = 20 + PUSH_DIST
    assert env.success()
    env.task = Task("place", 0, target=0)
    env.shapes[0].x, env.holding = 38.0, 0
    assert not env.success()  # still held
    env.holding = None
    assert env.success()


def test_views_follow_the_gripper():
    env = TableEnv(5)
    table, wrist = env.render()
    assert table.shape == (SIZE, SIZE, 3) and wrist.shape == (WRIST, WRIST, 3)
    env.gx, env.gy = 0.0, 0.0
    _, corner = env.render()
    assert (corner[:8, :8] == corner[0, 0]).all() and corner[0, 0].tolist() == [70, 70, 76]  # the floor


def test_expert_solves_and_random_does_not():
    eps = [record(seed, noise=0.2) for seed in range(60)]
    assert all(e.success for e in eps)
    e = eps[0]
    assert e.table.shape == (len(e.actions) + 1, SIZE, SIZE, 3) and e.wrist.shape[1:] == (WRIST, WRIST, 3)
    assert np.abs(e.actions).max() <= 1
    rng = np.random.default_rng(0)
    random = [rollout(TableEnv(1000 + s), lambda env: rng.uniform(-1, 1, 3)).success for s in range(60)]
    assert np.mean(random) < 0.1
    again = record(7, noise=0.2)
    assert np.array_equal(again.actions, record(7, noise=0.2).actions)  # demonstrations are seeded


def test_expert_is_closed_loop():
    """Knocked off course mid-episode, it still finishes."""
    env = TableEnv(11)
    for t in range(80):
        a = expert(env)
        if t == 5:
            a = np.array([-1.0, 1.0, -1.0])
        if env.step(a):
            break
    assert env.success()


def test_demonstrations_become_vla_training_rows(tmp_path):
    from emu3.action import ActionIds, FASTTokenizer
    from emu3.data.loader import Loader
    from emu3.data.shards import TokenDataset
    from emu3.format import Formatter
    from emu3.tokenizer import TextTokenizer
    from emu3.vision import VisionTokenizer
    from emu3.world.build import build_demonstrations, vla_windows

    eps = [record(s) for s in range(20)]
    chunks = np.stack([c for e in eps for frames in vla_windows(e, 5, 2) for _, c in frames])  # (N, 5, 3)
    fast = FASTTokenizer.fit(chunks, scale=10, vocab_size=128)
    text = TextTokenizer.train([e.instruction for e in eps] * 3, 300, 1024, min_frequency=1, reserved=128)
    acts = ActionIds(text.vocab.text_size, 128)
    n = build_demonstrations(tmp_path / "vla", VisionTokenizer.from_preset("demo"), text, fast, acts, episodes=2,
                             window=2, progress=False)
    ds = TokenDataset(tmp_path / "vla")
    assert len(ds) == n == len(eps[0].actions) + len(eps[1].actions)  # a window per step
    r = ds[0]
    assert r.fields["v0_0"].shape == (8, 8) and r.fields["v0_1"].shape == (4, 4)  # table 64x64, wrist 32x32
    assert text.decode(r.fields["instruction"].tolist()) == eps[0].instruction
    assert np.abs(fast.decode(r.fields["a0"]) - eps[0].actions[:5]).max() <= fast.max_error
    assert np.abs(fast.decode(r.fields["a1"]) - eps[0].actions[5:10]).max() <= fast.max_error
    loader = Loader([(str(tmp_path / "vla"), 1.0)], Formatter(text), seq_len=512, batch_size=2)
    doc = loader.document(r)
    assert acts.from_lm(doc.ids).tolist() == r.fields["a0"].tolist() + r.fields["a1"].tolist()
    batch = loader.next_batch()
    assert batch.input_ids.shape == (2, 512)
    action = (batch.targets >= acts.start) & (batch.targets < acts.start + acts.count)
    assert action.any() and (batch.weights[action] == 1.0).all()  # actions weigh 1; visual codes vision_weight


def test_policy_closed_loop_on_a_tiny_model(tmp_path):
    """The policy machinery end to end on a random model: constrained action decoding, FAST decoding,
    the sliding window, the evaluation's figures (success itself needs trained weights) and DAgger
    records (the policy's states, the expert's chunks)."""
    import torch

    from emu3.action import FASTTokenizer
    from emu3.checkpoint import save_model
    from emu3.model import Emu3LM, model_config
    from emu3.pipeline import Emu3
    from emu3.tokenizer import TextTokenizer
    from emu3.vision import VisionTokenizer
    from emu3.vla import Policy, evaluate
    from emu3.world.build import vla_windows

    eps = [record(s) for s in range(10)]
    fast = FASTTokenizer.fit(np.stack([c for e in eps for fr in vla_windows(e, 5, 2) for _, c in fr]), vocab_size=64)
    text = TextTokenizer.train([e.instruction for e in eps] * 3, 300, 1024, min_frequency=1, reserved=64)
    vision = VisionTokenizer.from_preset("demo")
    model = Emu3LM(model_config("tiny", text.vocab))
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, tmp_path / "m", tokenizer=text, vq=vision.model,
               extra_files={"vision_tokenizer": {"preprocessor_config.json": vision.processor.to_dict()}})
    fast.save_pretrained(tmp_path / "m")
    emu = Emu3.from_pretrained(tmp_path / "m")
    policy = Policy(emu, fast, history=1)
    env = TableEnv(100_000)
    chunk = policy.chunk(env)
    assert chunk.shape == (5, 3) and np.abs(chunk).max() <= 1 and len(policy.history) == 1
    policy.chunk(env)
    assert len(policy.history) == 1  # a sliding window of one earlier frame
    policy = Policy(emu, fast)  # the default: the current views only
    assert policy.chunk(env).shape == (5, 3) and policy.history == []
    r = evaluate(policy, episodes=2, horizon=60)
    assert r["expert"] == 1.0 and r["random"] == 0.0 and 0 <= r["policy"] <= 1
    assert r["queries"] >= 3 and r["actions_per_s"] > 0
    assert abs(r["share_model"] + r["share_vision"] + r["share_fast"] + r["share_rest"] - 1) < 1e-6
    from emu3.cli import main

    assert main(["eval-vla", "--model", str(tmp_path / "m"), "--episodes", "1", "--horizon", "10",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["episodes"] == 1

    from emu3.action import ActionIds
    from emu3.data.shards import TokenDataset
    from emu3.world.build import build_dagger, expert_chunk

    r = build_dagger(tmp_path / "dagger", policy, vision, text, fast, ActionIds(text.vocab.text_size, 64), episodes=1,
                     seed=3, progress=False)
    visited = rollout(TableEnv(3 * 1_000_003), Policy(emu, fast))  # greedy: the same states again
    ds = TokenDataset(tmp_path / "dagger")
    assert r["records"] == len(ds) == len(visited.actions) and r["policy_success"] == float(visited.success)
    replay = TableEnv(3 * 1_000_003)
    for t, a in enumerate(visited.actions[:12]):
        label = fast.decode(ds[t].fields["a0"])
        assert np.abs(label - expert_chunk(replay, 5)).max() <= fast.max_error + 1e-6
        replay.step(a)


def test_expert_chunk_is_what_the_expert_does_next():
    from emu3.world.build import action_chunk, expert_chunk

    env = TableEnv(5)
    ep = rollout(TableEnv(5), expert)
    assert np.allclose(expert_chunk(env, 5), ep.actions[:5])
    for a in ep.actions[:-2]:
        env.step(a)
    assert env.steps == len(ep.actions) - 2 and not env.success()
    assert np.allclose(expert_chunk(env, 5), action_chunk(ep.actions, len(ep.actions) - 2, 5))  # held after success


def test_eval_vla_refuses_a_folder_without_fast_tokens(tmp_path, model_folder, capsys):
    from emu3.cli import main

    assert main(["eval-vla", "--model", str(model_folder), "--episodes", "1"]) != 0
    assert "fast_tokenizer.json" in capsys.readouterr().err
