"""Reflow and distillation training (DESIGN §11): the objectives against NumPy oracles written
from the formulas, distillation's timestep against the Euler sampler, init_from, sampling
defaults carried by a checkpoint, and tiny end-to-end runs on teacher pairs (learning, exact
resume)."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as ref
from conftest import ROOT
from pixelflow_jax.config import ModelParams, load_config
from pixelflow_jax.errors import UserError
from pixelflow_jax.objective import (PSEUDO_HUBER_C, distill_prediction, distill_timesteps,
                                     draw_pair_rows, pair_loss_fn, reflow_inputs,
                                     u_shaped_time)
from pixelflow_jax.scheduler import CascadeSchedule

S, K, C = 4, 1000, 3
TINY = os.path.join(ROOT, "configs", "pixelflow_tiny_train.yaml")  # 16 px, 3 stages, 3 classes
SCHEDULE = CascadeSchedule(S, K)
SIDES = (4, 8, 16, 32)


def oracle_T(stage, t_index):
    """The model timestep of grid index i: a stage's K values run evenly from T_first to
    T_last (DESIGN §3)."""
    st = ref.stage_schedule(S, K)[stage]
    return st["T_first"] + (st["T_last"] - st["T_first"]) * np.asarray(t_index, float) / (K - 1)


def random_pairs(G, seed=0):
    rng = np.random.default_rng(seed)
    starts = [rng.standard_normal((G, r, r, C)) for r in SIDES]
    ends = [0.7 * a + 0.3 * rng.standard_normal(a.shape) for a in starts]
    return starts, ends, rng.integers(0, 10, G)


class Stub:
    """A 'model' whose output depends on x, T and the label: a wrong T or label shows."""

    params = ModelParams(num_attention_heads=1, attention_head_dim=4, in_channels=3,
                         out_channels=3, depth=1, patch_size=1, num_classes=10)

    def __call__(self, x, T, labels):
        return -0.4 * x + (T / 1000.0 + labels / 10.0)[:, None, None, None]


def stub_np(x, T, labels):
    return -0.4 * x + (np.asarray(T, np.float64) / 1000 + np.asarray(labels) / 10)[:, None, None,
                                                                                   None]


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("stage", range(S))
def test_reflow_inputs_match_oracle(stage):
    starts, ends, _ = random_pairs(6, seed=stage)
    t_index = np.array([0, 1, 250, 500, 998, 999])
    x_t, target, T = reflow_inputs(jnp.asarray(starts[stage], jnp.float32),
                                   jnp.asarray(ends[stage], jnp.float32),
                                   jnp.asarray(t_index, jnp.int32), stage, SCHEDULE)
    t = (t_index / K)[:, None, None, None]
    np.testing.assert_allclose(x_t, t * ends[stage] + (1 - t) * starts[stage], rtol=1e-5,
                               atol=2e-6)
    np.testing.assert_allclose(target, ends[stage] - starts[stage], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(T, oracle_T(stage, t_index), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("t_density", ["uniform", "u_shaped"])
def test_reflow_loss_is_the_mean_of_per_row_mse(t_density):
    G = 3
    starts, ends, labels = random_pairs(G, seed=5)
    key = jax.random.key(7)
    loss = pair_loss_fn(Stub(), [jnp.asarray(a, jnp.float32) for a in starts],
                        [jnp.asarray(a, jnp.float32) for a in ends], jnp.asarray(labels), key,
                        SCHEDULE, objective="reflow", label_dropout=0.3, t_density=t_density)
    # The randomness (not the expected value) is the code's: row j = g S + s.
    t_index, drop = (np.asarray(a) for a in draw_pair_rows(key, jnp.arange(G * S), K,
                                                           t_density, 0.3))
    assert drop.any() and not drop.all()  # both label paths are exercised
    per_row = []
    for g in range(G):
        for s in range(S):
            j = g * S + s
            t = t_index[j] / K
            x_t = t * ends[s][g:g + 1] + (1 - t) * starts[s][g:g + 1]
            lab = np.array([10 if drop[j] else labels[g]])
            pred = stub_np(x_t, oracle_T(s, [t_index[j]]), lab)
            per_row.append(np.mean((pred - (ends[s][g:g + 1] - starts[s][g:g + 1])) ** 2))
    assert float(loss) == pytest.approx(np.mean(per_row), rel=2e-6)


@pytest.mark.parametrize("kind", ["l2", "pseudo_huber"])
def test_distill_loss_matches_oracle(kind):
    G = 3
    starts, ends, labels = random_pairs(G, seed=9)
    loss = pair_loss_fn(Stub(), [jnp.asarray(a, jnp.float32) for a in starts],
                        [jnp.asarray(a, jnp.float32) for a in ends], jnp.asarray(labels),
                        jax.random.key(0), SCHEDULE, objective="distill", distill_loss=kind,
                        shift=3.0)
    per_row = []
    for s, st in enumerate(ref.stage_schedule(S, K)):
        T, t = ref.inference_timesteps(st, 1, 3.0)  # one Euler step: T_first, dt = 1
        pred = starts[s] + (t[1] - t[0]) * stub_np(starts[s], np.full(G, T[0]), labels)
        err = (pred - ends[s]).reshape(G, -1)
        if kind == "l2":
            per_row += list(np.mean(err ** 2, axis=1))
        else:  # arXiv 2310.14189 with c = 0.00054 sqrt(d), divided by sqrt(d)
            d = err.shape[1]
            c = 0.00054 * math.sqrt(d)
            per_row += list((np.sqrt(np.sum(err ** 2, axis=1) + c ** 2) - c) / math.sqrt(d))
    assert float(loss) == pytest.approx(np.mean(per_row), rel=2e-6)
    assert PSEUDO_HUBER_C == 0.00054


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_distill_queries_the_euler_samplers_first_timestep(shift):
    from pixelflow_jax.solvers import Euler

    T, dt = distill_timesteps(SCHEDULE, shift)
    tables = Euler().inputs(SCHEDULE, 1, shift)  # what the sampler's Euler solver runs on
    np.testing.assert_array_equal(T, np.asarray(tables["T"])[:, 0])
    np.testing.assert_array_equal(dt, np.asarray(tables["dt"])[:, 0])
    np.testing.assert_array_equal(dt, np.ones(S, np.float32))
    np.testing.assert_allclose(T, [st["T_first"] for st in ref.stage_schedule(S, K)], atol=0)


def test_distill_prediction_is_one_sampler_step(c2i):
    """A one-stage cascade at one step: the sampler's image is the student's prediction."""
    from conftest import make_config
    from pixelflow_jax.checkpoint import model_from_tree
    from pixelflow_jax.noise import draw_cascade_noise
    from pixelflow_jax.sampling import Sampler

    cfg = make_config(c2i.params, resolution=8, num_stages=1)
    model = model_from_tree(c2i.tree, cfg)
    schedule = CascadeSchedule(1, K)
    labels = np.array([3, 7])
    x = Sampler(model, schedule, 8).generate(5, np.arange(2), labels=labels, steps=1,
                                             guidance=1.0)
    start = draw_cascade_noise(5, jnp.arange(2), (8,), C, schedule.gamma).init
    T, dt = distill_timesteps(schedule)
    want = distill_prediction(start, model(start, jnp.full((2,), T[0]), jnp.asarray(labels)),
                              float(dt[0]))
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)


def test_u_shaped_density():
    a = 4.0
    t = np.asarray(u_shaped_time(jnp.asarray(np.random.default_rng(0).random(200_000),
                                             jnp.float32)))
    assert t.min() >= 0 and t.max() <= 1
    # Independent draw, as arXiv 2405.20320 samples it: exp(a t) on [0, 1], mirrored half the time.
    rng = np.random.default_rng(1)
    e = np.log1p(rng.random(200_000) * math.expm1(a)) / a
    mirrored = np.where(rng.random(200_000) < 0.5, e, 1 - e)
    grid = np.linspace(0, 1, 21)
    ours = np.searchsorted(np.sort(t), grid) / t.size
    theirs = np.searchsorted(np.sort(mirrored), grid) / mirrored.size
    assert np.abs(ours - theirs).max() < 0.01  # two-sample KS distance
    # CDF F(t) = (sinh(a (t - 1/2)) + sinh(a/2)) / (2 sinh(a/2)): F(0.1) = 0.17250
    assert np.mean(t < 0.1) == pytest.approx(0.17250, abs=0.004)
    assert np.mean(t > 0.9) == pytest.approx(0.17250, abs=0.004)
    hist = np.histogram(t, bins=10, range=(0, 1))[0]
    assert hist[0] > 2.5 * hist[4] and hist[9] > 2.5 * hist[5]  # U-shaped: ~3x at the ends
    i, _ = draw_pair_rows(jax.random.key(0), jnp.arange(20_000), K, "u_shaped", 0.0)
    i = np.asarray(i)
    assert i.min() >= 0 and i.max() <= K - 1
    assert abs(np.mean(i < 100) - np.mean(mirrored < 0.1)) < 0.02


# ----------------------------------------------------------------------------- config, names


def test_config_keys_and_official_layout():
    official = load_config(os.path.join(ROOT, "configs", "pixelflow_xl_c2i.yaml"))
    assert "sample" not in official.to_dict()  # the new keys stay out of official files
    assert set(official.to_dict()["train"]) == {"lr", "weight_decay", "epochs"}
    assert official.train.dropout == 0.1 and official.train.objective == "flow"
    cfg = load_config(TINY, ["train.objective=distill", "data.pairs=P", "sample.steps=[2,1,1]",
                             "sample.guidance=1"])
    assert cfg.to_dict()["sample"] == {"steps": [2, 1, 1], "guidance": 1.0}
    assert cfg.train.dropout == 0.0
    for bad, words in [(["train.objective=reflow"], "set data.pairs"),
                       (["sample.steps=0"], "sample.steps must be integers >= 1"),
                       (["sample.steps=x"], "must be an integer or a list"),
                       (["sample.solver=heun"], "sample.solver must be"),
                       (["train.t_density=beta"], "train.t_density must be uniform or u_shaped")]:
        with pytest.raises(UserError, match=words):
            load_config(TINY, bad)
    for name in ("reflow", "distill"):  # the shipped recipes read
        for size in ("digits", "xl_c2i"):
            assert load_config(os.path.join(
                ROOT, "configs", f"pixelflow_{size}_{name}.yaml")).train.objective == name


def test_short_checkpoint_names(tmp_path, monkeypatch, capsys):
    import sample
    from pixelflow_jax import default_model

    assert default_model.resolve_checkpoint(None) == default_model.DEFAULT_CHECKPOINT
    assert default_model.resolve_checkpoint("digits") == default_model.DEFAULT_CHECKPOINT
    assert default_model.resolve_checkpoint("some/dir") == "some/dir"
    monkeypatch.setattr(default_model, "WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(UserError, match="'digits-1step' .* is not shipped"):
        default_model.resolve_checkpoint("digits-1step")
    assert sample.main(["--ckpt", "digits-1step", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "is not shipped" in err and err.count("\n") == 1
    (tmp_path / "weights" / "digits-1step").mkdir(parents=True)
    (tmp_path / "weights" / "digits-1step" / "config.yaml").write_text("")
    assert default_model.resolve_checkpoint("digits-1step") == str(
        tmp_path / "weights" / "digits-1step")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a folder of that name here wins
    assert default_model.resolve_checkpoint("digits") == "digits"


class ArrayPairs:
    """Stand-in pairs: image i's end at stage s is filled with 10 i + s."""

    def __init__(self, num, resolutions=(2, 4)):
        self.num, self.resolutions, self.channels = num, resolutions, 1
        self.labels = np.arange(num, dtype=np.int32) % 3

    def ends(self, stage, idx):
        r = self.resolutions[stage]
        return np.broadcast_to((10.0 * np.asarray(idx) + stage)[:, None, None, None],
                               (len(idx), r, r, 1)).astype(np.float32)


def test_pair_loader_order_resume_and_hosts():
    from pixelflow_jax.pair_data import PairLoader

    pairs, G = ArrayPairs(50), 8  # 6 steps an epoch, 2 pairs left out of each
    with PairLoader(pairs, G, np.arange(G), seed=4) as one:
        batches = [one.next() for _ in range(14)]
        assert one.state() == {"epoch": 2, "position": 2}
    epoch0 = np.concatenate([b["indices"] for b in batches[:6]])
    assert len(set(epoch0.tolist())) == 48  # an epoch visits distinct pairs
    assert not np.array_equal(epoch0, np.concatenate([b["indices"] for b in batches[6:12]]))
    for b in batches:
        np.testing.assert_array_equal(b["labels"], b["indices"] % 3)
        for s in (0, 1):
            np.testing.assert_array_equal(b["ends"][s][:, 0, 0, 0], 10.0 * b["indices"] + s)
    with PairLoader(pairs, G, np.arange(G), seed=4, state={"epoch": 1, "position": 3},
                    prefetch=0) as resumed:  # state after 9 batches
        for b in batches[9:]:
            np.testing.assert_array_equal(resumed.next()["indices"], b["indices"])
    halves = [PairLoader(pairs, G, rows, seed=4) for rows in (np.arange(4), np.arange(4, 8))]
    for b in batches[:7]:  # two hosts, each its device rows: together the one-host batch
        np.testing.assert_array_equal(
            np.concatenate([h.next()["indices"] for h in halves]), b["indices"])
    for h in halves:
        h.close()
    with pytest.raises(UserError, match="past the end of an epoch"):
        PairLoader(pairs, G, np.arange(G), state={"epoch": 0, "position": 6})


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def teacher_pairs(tmp_path_factory):
    """A tiny random teacher (normal-scale weights) and 240 of its guided pairs (4 steps)."""
    from pixelflow_jax import init_checkpoint, reflow, runtime

    runtime.enable_compilation_cache()  # the test cache (conftest): reruns compile less
    root = tmp_path_factory.mktemp("reflow")
    teacher, pairs = str(root / "teacher"), str(root / "pairs")
    assert init_checkpoint.main([TINY, teacher, "--weights", "normal", "--seed", "3"]) == 0
    assert reflow.main(["pairs", "--ckpt", teacher, "--out", pairs, "--num", "240", "--steps",
                        "4", "--cfg", "2", "--batch", "48", "--quiet"]) == 0
    return teacher, pairs


def pair_config(teacher_pairs, objective, *overrides):
    teacher, pairs = teacher_pairs
    return load_config(TINY, [f"train.objective={objective}", f"data.pairs={pairs}",
                              f"train.init_from={teacher}", "data.batch_size=24",
                              "train.log_every=1", *overrides])


def run_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in map(json.loads, f)}


def test_init_from_loads_the_teacher_exactly(teacher_pairs, tmp_path):
    from pixelflow_jax.checkpoint import _flatten, load_param_tree
    from pixelflow_jax.trainer import Trainer, learning_rate_schedule, optimizer

    cfg = pair_config(teacher_pairs, "reflow")
    trainer = Trainer(cfg, str(tmp_path / "unused"))
    tx = optimizer(cfg.train, learning_rate_schedule(cfg.train, 10))
    _, state = trainer.create_train_state(tx)
    want = _flatten(load_param_tree(teacher_pairs[0])[0])
    for part in ("params", "ema"):
        got = _flatten(jax.device_get(state[part]))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{part}.{k}")
    bad = Trainer(pair_config(teacher_pairs, "reflow", "model.params.depth=3"),
                  str(tmp_path / "bad"))
    with pytest.raises(UserError) as e:
        bad.create_train_state(tx)
    assert "depth 2 (here 3)" in str(e.value) and "\n" not in str(e.value)


def test_distilled_student_one_step_error_falls_and_samples_by_default(teacher_pairs,
                                                                       tmp_path, capsys):
    """The student (from the teacher) learns the teacher's pairs in one step per stage; its
    checkpoint carries steps 1, guidance 1, which sample.py uses unless told otherwise."""
    import sample
    from pixelflow_jax.checkpoint import load_checkpoint
    from pixelflow_jax.pairs import open_pairs
    from pixelflow_jax.sampling import Sampler
    from pixelflow_jax.trainer import Trainer

    teacher, pairs_dir = teacher_pairs
    out = tmp_path / "distill"
    cfg = pair_config(teacher_pairs, "distill", "train.steps=40", "train.lr=1e-3",
                      "train.ema_decay=0.9", "train.save_every=1000")
    result = Trainer(cfg, str(out)).run()
    assert result.status == "done"
    saved = load_config(out / "ema" / "config.yaml")
    assert dataclasses.asdict(saved.sample) == dict(steps=1, guidance=1.0, solver="euler",
                                                    shift=None)
    assert saved.train.objective == "distill"

    # One step per stage, unguided, from the teacher's own noise: error to the teacher's image.
    pairs = open_pairs(pairs_dir)
    idx = np.arange(96)
    model, _ = load_checkpoint(teacher)
    sampler = Sampler(model, CascadeSchedule(3, K), 16)

    def error(ckpt):
        sampler.set_params(nnx_params(load_checkpoint(ckpt)[0]))
        x = sampler.generate(pairs.seed, idx, labels=pairs.labels[idx], steps=1, guidance=1.0)
        return float(np.mean((np.asarray(x) - pairs.ends(2, idx)) ** 2))

    before, after = error(teacher), error(str(out / "ema"))
    assert after < 0.5 * before, (before, after)  # measured: 1.98 -> 0.40

    capsys.readouterr()
    folder = tmp_path / "samples"
    assert sample.main(["--ckpt", str(out / "ema"), "--classes", "0", "--num-images", "2",
                        "--out", str(folder)]) == 0
    err = capsys.readouterr().err
    assert "stage 1: 1, stage 2: 1, stage 3: 1 (total 3 per image)" in err
    with open(folder / "run.json") as f:
        settings = json.load(f)
    assert (settings["steps"], settings["guidance"], settings["solver"]) == ([1, 1, 1], 1.0,
                                                                             "euler")
    assert sample.main(["--ckpt", str(out / "ema"), "--classes", "0", "--num-images", "2",
                        "--steps", "3", "--cfg", "2", "--out", str(tmp_path / "g.png")]) == 0
    err = capsys.readouterr().err
    assert "stage 1: 3, stage 2: 3, stage 3: 3 (total 9 per image)" in err
    assert "guidance 2.0" in err


def nnx_params(model):
    from flax import nnx
    return nnx.to_pure_dict(nnx.state(model))


REFLOW = ["train.steps=17", "train.save_every=3", "train.t_density=u_shaped",
          "data.batch_size=48"]  # 16 pairs a step: an epoch of the 240 pairs is 15 steps


@pytest.fixture(scope="module")
def reflow_run(teacher_pairs, tmp_path_factory):
    """An uninterrupted 17-step reflow run (crossing an epoch of the pairs)."""
    from pixelflow_jax.trainer import Trainer

    out = tmp_path_factory.mktemp("reflow_full")
    assert Trainer(pair_config(teacher_pairs, "reflow", *REFLOW), str(out)).run().status \
        == "done"
    return out


def test_reflow_resumes_with_identical_losses(teacher_pairs, reflow_run, tmp_path):
    """Killed after step 7 with the last save at step 6, the same run resumes and logs the
    losses of an uninterrupted one, step for step, across an epoch of the pairs."""
    import shutil

    from pixelflow_jax.trainer import Trainer

    cut = tmp_path / "cut"
    assert Trainer(pair_config(teacher_pairs, "reflow", *REFLOW),
                   str(cut)).run(stop_after=7).status == "stopped"
    shutil.rmtree(cut / "checkpoints" / "7")  # as if killed before step 7's save
    assert Trainer(pair_config(teacher_pairs, "reflow", *REFLOW), str(cut)).run().status \
        == "done"
    assert sorted(run_losses(reflow_run)) == list(range(1, 18))
    assert run_losses(cut) == run_losses(reflow_run)  # loss, grad norm, lr: bit for bit
    saved = load_config(reflow_run / "config.yaml")
    assert (saved.sample.steps, saved.sample.guidance) == (2, 1.0)  # reflow: 2 steps/stage
    assert saved.train.dropout == 0.0  # label dropout off for pair objectives by default


def test_reflow_losses_do_not_depend_on_the_device_count(teacher_pairs, reflow_run, tmp_path):
    """train.py on 8 simulated devices with FSDP 2 (3 rows per device: each host and device
    reads its own pair groups) logs the 1-device run's losses."""
    import subprocess
    import sys

    teacher, pairs = teacher_pairs
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    overrides = [o for o in REFLOW if not o.startswith(("data.batch_size", "train.steps"))]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), TINY, "--out", str(tmp_path / "8"),
         "--set", "train.objective=reflow", f"data.pairs={pairs}", f"train.init_from={teacher}",
         "train.log_every=1", "data.batch_size=6", "train.fsdp=2", "train.steps=3",
         *overrides], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 8 device(s)" in proc.stderr and "reflow on 240 teacher pairs" in proc.stderr
    one, eight = run_losses(reflow_run), run_losses(tmp_path / "8")
    for step in (1, 2, 3):  # constant lr: the first steps do not depend on train.steps
        np.testing.assert_allclose(eight[step], one[step], rtol=2e-5)
