"""Datasets of the shapes world for the built-in model: a text corpus for its BPE, and token shards
(the format of `emu3 tokenize-dataset`) of captioned images, questions and answers, videos and
interleaved stories, rendered in memory and encoded with a vision tokenizer in large batches.

Seeds: record i of kind k is drawn from PCG64([seed, kind index, i]), so datasets are reproducible
and a held-out set is just another seed (the evaluators use seed 10_000 and up; training 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.shards import FORMAT, VERSION, Record, write_index, write_shard
from ..errors import InputError
from .motion import describe, sample_clip
from .scenes import COLORS, Shape, article, caption, fits, questions, relation, render, sample_scene

KINDS = ("images", "qa", "videos", "stories", "reasoned")


def rng_for(seed: int, kind: str, i: int) -> np.random.Generator:
    """`reasoned` records draw from qa's generators: the same scenes and questions, answered with reasons."""
    return np.random.default_rng([seed, KINDS.index("qa" if kind == "reasoned" else kind), i])


def story(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Three steps: a shape appears, a second one joins beside it, the first changes colour."""
    first = sample_scene(rng, 1)
    a = first.shapes[0]
    steps = [(f"first, {article(a.color)} {a.color} {a.kind} appears.", render(first))]
    second = None
    for _ in range(100):
        cand = sample_scene(rng, 1).shapes[0]
        if fits([a], cand, first.size):
            second = cand
            break
    if second is None:
        second = Shape("circle", "blue", 64 - a.x, 64 - a.y, 5.0)
    two = type(first)([a, second], first.background)
    rel = relation(second, a) or "next to"
    steps.append((f"then {article(second.color)} {second.color} {second.kind} appears {rel} it.", render(two)))
    new = [c for c in COLORS if c != a.color][int(rng.integers(len(COLORS) - 1))]
    changed = type(first)([Shape(a.kind, new, a.x, a.y, a.r), second], first.background)
    steps.append((f"finally the {a.kind} turns {new}.", render(changed)))
    return steps


def corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Text for the BPE: captions, questions, answers, motion descriptions, stories."""
    texts = []
    for i in range(n):
        rng = rng_for(seed, "images", i)
        scene = sample_scene(rng)
        texts.append(caption(scene, rng))
        texts += [f"{q} {a}" for q, a in questions(scene, rng, 2)]
        if i % 4 == 0:
            texts.append(describe(sample_clip(rng_for(seed, "videos", i))))
            texts += [t for t, _ in story(rng_for(seed, "stories", i))]
    return texts


def _write(out: Path, records: list[Record], vocab: dict, shard_size: int = 4096, extra: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(records), shard_size)):
        chunk = records[start:start + shard_size]
        shards.append({**write_shard(out, s, chunk), "inputs": len(chunk), "skipped": {}})
    write_index(out, {"format": FORMAT, "version": VERSION, "vocab": vocab, **(extra or {}), "shards": shards})


def build(out: str | os.PathLike, vision, text, counts: dict[str, int], seed: int = 0, batch: int = 256,
          progress: bool = True, first: int = 0) -> dict[str, int]:
    """Write one dataset per kind under `out` (images/, qa/, videos/, stories/, reasoned/) of records
    first .. first + count - 1 (so a later stage can add records that an earlier one did not draw); returns
    record counts. A `qa` record answers in one word ("two"), a `reasoned` one first names the scene's objects
    from left to right ("red circle: one, blue square: one, green circle: two, so two")."""
    out = Path(out)
    vocab = {"text_size": text.vocab.text_size, "codebook_size": text.vocab.codebook_size}
    ids = lambda s: np.asarray(text.encode(s, allow_special=False), np.int64)  # noqa: E731
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(counts.values()), unit="rec", desc="world", dynamic_ncols=True)

    def encode(images: list[np.ndarray]) -> list[np.ndarray]:
        return [c.numpy() for c in vision.encode_images(images)]

    done = {}
    for kind in KINDS:
        n = counts.get(kind, 0)
        if not n:
            continue
        records: list[Record] = []
        for start in range(first, first + n, batch):
            items = range(start, min(first + n, start + batch))
            if kind in ("images", "qa", "reasoned"):
                drawn = []
                for i in items:
                    rng = rng_for(seed, kind, i)
                    drawn.append((rng, sample_scene(rng)))
                codes = encode([render(sc) for _, sc in drawn])
                for (rng, sc), c in zip(drawn, codes):
                    if kind == "images":
                        records.append(Record("image", {"caption": ids(caption(sc, rng)), "codes": c}))
                    else:
                        (q, a), = questions(sc, rng, 1, reasons=kind == "reasoned")
                        records.append(Record("qa", {"codes": c, "question": ids(q), "answer": ids(a)}))
            elif kind == "videos":
                for i in items:
                    clip = sample_clip(rng_for(seed, kind, i))
                    c = vision.encode_video(clip.render(), "causal").numpy()
                    records.append(Record("video", {"caption": ids(describe(clip)), "codes": c},
                                          {"fps": 8.0, "frames": clip.frames, "mode": "causal"}))
            else:
                for i in items:
                    steps = story(rng_for(seed, kind, i))
                    codes = encode([img for _, img in steps])
                    fields = {}
                    for j, ((t, _), c) in enumerate(zip(steps, codes)):
                        fields[f"s{2 * j}"], fields[f"s{2 * j + 1}"] = ids(t), c
                    records.append(Record("interleaved", fields, {"segments": ["text", "image"] * len(steps)}))
            if bar is not None:
                bar.update(len(items))
        # the spatial factor tells a model trained on these images the size to draw (emu3.train.trainer.data_info)
        _write(out / kind, records, vocab, extra={"spatial_factor": vision.model.config.spatial_factor})
        done[kind] = len(records)
    if bar is not None:
        bar.close()
    return done


# --------------------------------------------------------------------------------------------
# Demonstrations of the table-top task (vision-language-action)


def action_chunk(actions: np.ndarray, t: int, chunk: int) -> np.ndarray:
    """actions[t:t+chunk], (chunk, 3); past the episode's end the gripper holds still (keeping its grip)."""
    hold = np.array([0.0, 0.0, actions[-1, 2] if len(actions) else -1.0], np.float32)
    part = actions[t:t + chunk]
    return np.concatenate([part, np.repeat(hold[None], chunk - len(part), 0)]) if len(part) < chunk else part


def vla_windows(episode, chunk: int, window: int):
    """Every (views, action chunk) window of an episode, one per start step: frame j of a window is the
    observation at step t + j*chunk (the last one once the episode has ended) and the chunk taken there."""
    last = len(episode.table) - 1
    for t in range(len(episode.actions)):
        frames = []
        for j in range(window):
            s = t + j * chunk
            frames.append((min(s, last), action_chunk(episode.actions, s, chunk)))
        yield frames


def build_demonstrations(out: str | os.PathLike, vision, text, fast, actions, episodes: int, seed: int = 0,
                         chunk: int = 5, window: int = 1, noise: float = 0.1, progress: bool = True) -> int:
    """Expert demonstrations as `vla` records (instruction, table and wrist codes, FAST tokens);
    episode i is emu3.world.table.record(seed * 1_000_003 + i). Returns the record count."""
    from .table import record

    def episodes_():
        for i in range(episodes):
            ep = record(seed * 1_000_003 + i, noise)
            yield ep, vla_windows(ep, chunk, window)

    return _write_vla(out, episodes_(), episodes, vision, text, fast, actions, window, "demonstrations", progress)


def expert_chunk(env, chunk: int) -> np.ndarray:
    """(chunk, 3): what the noise-free expert does next from env's state (on a copy), held still after
    it succeeds, like the end of a demonstration (action_chunk)."""
    import copy

    from .table import expert

    env = copy.deepcopy(env)
    acts = []
    for _ in range(chunk):
        acts.append(expert(env))
        if env.step(acts[-1]):
            break
    return action_chunk(np.asarray(acts, np.float32), 0, chunk)


def build_dagger(out: str | os.PathLike, policy, vision, text, fast, actions, episodes: int, seed: int = 0,
                 chunk: int = 5, progress: bool = True) -> dict:
    """DAgger (Ross et al., 2011): run `policy` (an emu3.vla.Policy) closed-loop on training tables
    (seeds seed * 1_000_003 + i, those of the demonstrations) and label every state it visits with the
    expert's next chunk from there, as one-frame `vla` records. Behaviour cloning only sees states
    near the expert's path; these teach the way back from the policy's own mistakes. Returns the
    policy's success rate on these tables and the record count."""
    from .table import TableEnv, rollout

    wins = []

    def episodes_():
        for i in range(episodes):
            env, labels = TableEnv(seed * 1_000_003 + i), []
            policy.reset()

            def act(e, labels=labels):
                labels.append(expert_chunk(e, chunk))
                return policy(e)

            ep = rollout(env, act)
            wins.append(ep.success)
            yield ep, [[(t, c)] for t, c in enumerate(labels)]

    n = _write_vla(out, episodes_(), episodes, vision, text, fast, actions, 1, "DAgger rollouts", progress)
    return {"records": n, "policy_success": float(np.mean(wins)), "episodes": episodes}


def _write_vla(out, episodes, total: int, vision, text, fast, actions, window: int, desc: str,
               progress: bool) -> int:
    """episodes: (Episode, windows) pairs, each window [(frame index, (chunk, 3) actions)]."""
    out = Path(out)
    vocab = {"text_size": text.vocab.text_size, "codebook_size": text.vocab.codebook_size}
    if actions.start + actions.count != text.vocab.text_size or fast.config.vocab_size > actions.count:
        raise InputError(f"the {fast.config.vocab_size} FAST tokens must fit the last {actions.count} ids of the "
                         f"text vocabulary ({text.vocab.text_size} ids)")
    records: list[Record] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="episode", desc=desc, dynamic_ncols=True)
    for ep, windows in episodes:
        codes = [c.numpy() for c in vision.encode_images(list(ep.table) + list(ep.wrist))]
        n = len(ep.table)
        instruction = np.asarray(text.encode(ep.instruction, allow_special=False), np.int64)
        for frames in windows:
            fields = {"instruction": instruction}
            for j, (s, act) in enumerate(frames):
                fields[f"v{j}_0"], fields[f"v{j}_1"] = codes[s], codes[n + s]
                fields[f"a{j}"] = np.asarray(fast.encode(act), np.int64)
            records.append(Record("vla", fields, {"frames": window, "views": 2, "action_count": actions.count}))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _write(out, records, vocab)
    return len(records)
