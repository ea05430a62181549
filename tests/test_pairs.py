"""Teacher pairs and straightness (DESIGN §11): the stored ends and rebuilt starts are what
the teacher cascade used, resume and device count change nothing, and the straightness
measure matches a NumPy computation of its definition."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, TINY_C2I, make_config
from pixelflow_jax import reflow
from pixelflow_jax.cascade import run_cascade
from pixelflow_jax.checkpoint import model_from_tree, save_checkpoint
from pixelflow_jax.convert import official_to_nnx
from pixelflow_jax.errors import UserError
from pixelflow_jax.noise import draw_cascade_noise
from pixelflow_jax.pairs import (PARTS, bytes_per_image, make_pairs, open_pairs, pair_settings,
                                 plan_pairs, stage_starts_jax)
from pixelflow_jax.random_weights import normal_scale_state_dict
from pixelflow_jax.sampling import Sampler
from pixelflow_jax.scheduler import CascadeSchedule
from pixelflow_jax.solvers import Euler

RES, STAGES = 16, 3          # stages at 4, 8, 16 px (patch 2)
NUM, BATCH = 10, 4           # three batches, the last one short (2 images + 2 padding rows)
SEED, GUIDANCE, STEPS = 7, 3.0, [3, 2, 2]


@dataclasses.dataclass(frozen=True)
class ProbeEuler(reflow.StraightnessEuler):
    """The straightness measure's Euler, whose extras also hold the state the cascade
    driver handed each stage solve: the start the teacher really used."""

    def solve_stage(self, velocity, y, cond, stage, inputs):
        *out, aux = super().solve_stage(velocity, y, cond, stage, inputs)
        return (*out, dict(aux, start=y[0]))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    cfg = make_config(TINY_C2I, resolution=RES, num_stages=STAGES)
    tree = official_to_nnx(normal_scale_state_dict(cfg.params, 5), cfg.params)
    folder = str(tmp_path_factory.mktemp("teacher") / "tiny")
    save_checkpoint(folder, tree, cfg)
    return folder, model_from_tree(tree, cfg), cfg


def draw_pairs(sampler, folder, ckpt, **kwargs):
    settings = pair_settings(sampler, NUM, seed=SEED, guidance=GUIDANCE, steps=STEPS, shift=1.0,
                             batch=BATCH, storage="float32",
                             teacher={"checkpoint": ckpt, "dtype": "float32"})
    return make_pairs(sampler, plan_pairs(folder, settings), quiet=True, **kwargs)


@pytest.fixture(scope="module")
def sampler(teacher):
    _, model, _ = teacher
    return Sampler(model, CascadeSchedule(STAGES), RES, trace=True)


@pytest.fixture(scope="module")
def probe(teacher):
    """One compiled program for the capture and straightness tests (batch BATCH)."""
    _, model, _ = teacher
    return Sampler(model, CascadeSchedule(STAGES), RES, solver=ProbeEuler(), trace=True)


@pytest.fixture(scope="module")
def pairs_dir(teacher, sampler, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pairs") / "p")
    summary = draw_pairs(sampler, folder, teacher[0])
    assert summary.written == NUM and summary.batches_left == 0
    return folder


def all_ends(pairs):
    idx = np.arange(pairs.num)
    return [pairs.ends(s, idx) for s in range(len(pairs.resolutions))]


def test_record_labels_and_storage(pairs_dir):
    pairs = open_pairs(pairs_dir, verify=True)
    assert (pairs.num, pairs.resolutions, pairs.channels) == (NUM, (4, 8, 16), 3)
    np.testing.assert_array_equal(pairs.labels, np.arange(NUM) % 10)
    assert pairs.labels.dtype == np.int32
    assert pairs.teacher["steps"] == STEPS and pairs.teacher["guidance"] == GUIDANCE
    assert pairs.teacher["seed"] == SEED and pairs.teacher["solver"] == "euler"
    # Renoise coefficients from DESIGN §3 with S = 3: ost = s/3 on the 1000-step grid
    # (0.333, 0.666), c = 2.
    for s in (1, 2):
        ost = int(1000 * s / 3) / 1000
        alpha = 1 / (2 * (1 - ost) + ost)
        assert pairs.alphas[s] == pytest.approx(alpha, abs=1e-6)
        assert pairs.betas[s] == pytest.approx(alpha * (1 - ost) / np.sqrt(1 / 3), abs=1e-6)
    # One part per batch; payload 4 bytes x (4^2 + 8^2 + 16^2) x 3 per image.
    assert bytes_per_image(pairs.resolutions, 3) == 4 * 336 * 3
    assert sorted(os.listdir(os.path.join(pairs_dir, PARTS))) == [
        "000000-000004.npz", "000004-000008.npz", "000008-000010.npz"]


def test_ends_and_starts_are_what_the_teacher_used(teacher, probe, pairs_dir):
    """Starts captured from inside the cascade driver (the state each stage solve was
    handed) and ends from its trace, in the pairs' own batches; the last end against a
    plain sample.py-style Sampler run (no trace) of all images at once."""
    _, model, _ = teacher
    pairs = open_pairs(pairs_dir)
    capture = probe
    labels = np.arange(NUM) % 10
    got_starts = [[] for _ in range(STAGES)]
    got_ends = [[] for _ in range(STAGES)]
    for lo in range(0, NUM, BATCH):
        rows = np.minimum(np.arange(lo, lo + BATCH), NUM - 1)
        out = capture.sample(SEED, rows, labels=labels[rows], steps=STEPS, guidance=GUIDANCE)
        real = min(BATCH, NUM - lo)
        for s in range(STAGES):
            got_starts[s].append(np.asarray(out.trace.aux[s]["start"])[:real])
            got_ends[s].append(np.asarray(out.trace.ends[s])[:real])
    idx = np.arange(NUM)
    for s in range(STAGES):
        np.testing.assert_allclose(pairs.ends(s, idx), np.concatenate(got_ends[s]),
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(pairs.starts(s, idx), np.concatenate(got_starts[s]),
                                   rtol=0, atol=1e-6)
    # Any order and repeats: rows are looked up per index.
    pick = np.array([9, 0, 5, 5, 3, 1, 1, 8, 2, 7])
    np.testing.assert_array_equal(pairs.ends(1, pick), pairs.ends(1, idx)[pick])
    np.testing.assert_array_equal(pairs.starts(2, pick), pairs.starts(2, idx)[pick])
    # The stages are distinct, and a start is not its end.
    assert np.abs(pairs.starts(2, idx) - pairs.ends(2, idx)).mean() > 0.1
    plain = Sampler(model, CascadeSchedule(STAGES), RES)
    x = np.asarray(plain.sample(SEED, idx, labels=labels, steps=STEPS, guidance=GUIDANCE).x)
    # Batch 10 against the pairs' batches of 4: float32 rounding only (DESIGN §6, §10).
    np.testing.assert_allclose(pairs.ends(STAGES - 1, idx), x, rtol=0, atol=1e-4)


def test_starts_rebuild_jittable(pairs_dir):
    """stage_starts_jax under jit on device (as the trainer calls it) = Pairs.starts; the
    stage-0 start is the image's initial noise and stage s > 0 the DESIGN §3 renoise of
    the previous end, recomputed here in NumPy from the same noise."""
    pairs = open_pairs(pairs_dir)
    idx = np.array([1, 8, 2, 0, 9, 3, 4, 7, 6, 5])  # NUM long: Pairs.starts compiled already
    noise = draw_cascade_noise(SEED, jnp.asarray(idx), pairs.resolutions, 3, pairs.gamma)
    np.testing.assert_array_equal(pairs.starts(0, idx), np.asarray(noise.init))
    fn = jax.jit(stage_starts_jax, static_argnames=("stage", "resolutions", "channels",
                                                    "gamma", "alphas", "betas"))
    for s in (1, 2):
        prev = pairs.ends(s - 1, idx).astype(np.float64)
        up = prev.repeat(2, axis=1).repeat(2, axis=2)
        want = pairs.alphas[s] * up + pairs.betas[s] * np.asarray(noise.blocks[s - 1], np.float64)
        got = fn(jnp.uint32(SEED), jnp.asarray(idx), stage=s, prev_ends=jnp.asarray(prev),
                 **pairs.start_args())
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(pairs.starts(s, idx), np.asarray(got), rtol=0, atol=1e-6)


def test_resume_after_kill_gives_identical_pairs(teacher, sampler, pairs_dir, tmp_path):
    ckpt = teacher[0]
    folder = str(tmp_path / "p")
    first = draw_pairs(sampler, folder, ckpt, max_batches=1)  # "killed" after one batch
    assert first.written == BATCH and first.batches_left == 2
    with pytest.raises(UserError, match="incomplete: 6 of 10 images are missing"):
        open_pairs(folder)
    parts = os.path.join(folder, PARTS)
    # What a kill -9 leaves: a half-written temporary, and (disk damage) a cut part file.
    with open(os.path.join(parts, ".tmp-0123456789abcdef.npz"), "wb") as f:
        f.write(b"PK\x03\x04 half")
    whole = os.path.join(parts, "000000-000004.npz")
    with open(whole, "rb") as f:
        data = f.read()
    with open(os.path.join(parts, "000004-000008.npz"), "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(UserError, match="damaged part file"):
        open_pairs(folder)
    second = draw_pairs(sampler, folder, ckpt)
    assert second.written == NUM - BATCH  # the cut batch redrawn, the first kept
    assert sorted(os.listdir(parts)) == sorted(os.listdir(os.path.join(pairs_dir, PARTS)))
    for a, b in zip(all_ends(open_pairs(folder)), all_ends(open_pairs(pairs_dir))):
        np.testing.assert_array_equal(a, b)
    assert draw_pairs(sampler, folder, ckpt).drawn == 0  # complete: nothing to do
    # Other settings are refused, not mixed in.
    settings = pair_settings(sampler, NUM, seed=SEED + 1, guidance=GUIDANCE, steps=STEPS,
                             shift=1.0, batch=BATCH, storage="float32",
                             teacher={"checkpoint": ckpt, "dtype": "float32"})
    with pytest.raises(UserError, match="other settings.*seed"):
        plan_pairs(folder, settings)


def test_damage_is_one_line_error(pairs_dir, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(pairs_dir, folder)
    path = os.path.join(folder, PARTS, "000004-000008.npz")
    with open(path, "r+b") as f:  # flip one payload byte: only the CRC can tell
        f.seek(os.path.getsize(path) - 400)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    open_pairs(folder, verify=False)  # structure intact
    with pytest.raises(UserError, match="000004-000008.npz is damaged"):
        open_pairs(folder, verify=True)
    with pytest.raises(UserError, match="no such folder"):
        open_pairs(str(tmp_path / "none"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="not a pair folder"):
        open_pairs(str(tmp_path / "empty"))
    with open(os.path.join(folder, "pairs.json"), "w") as f:
        f.write("{")
    with pytest.raises(UserError, match="not readable JSON"):
        open_pairs(folder)


def test_float16_storage(teacher, sampler, pairs_dir, tmp_path):
    settings = pair_settings(sampler, NUM, seed=SEED, guidance=GUIDANCE, steps=STEPS,
                             shift=1.0, batch=BATCH, storage="float16",
                             teacher={"checkpoint": teacher[0], "dtype": "float32"})
    folder = str(tmp_path / "f16")
    make_pairs(sampler, plan_pairs(folder, settings), quiet=True)
    half, full = open_pairs(folder), open_pairs(pairs_dir)
    size = lambda d: sum(os.path.getsize(os.path.join(d, PARTS, n))
                         for n in os.listdir(os.path.join(d, PARTS)))
    assert size(folder) < 0.55 * size(pairs_dir)
    for a, b in zip(all_ends(half), all_ends(full)):
        assert a.dtype == np.float32
        # float16 keeps 11 significant bits: half an ulp is 2^-11 relative.
        np.testing.assert_allclose(a, b, rtol=2.0 ** -11, atol=1e-7)


def test_pairs_identical_on_one_and_eight_devices(teacher, pairs_dir, tmp_path):
    """The command line on 8 simulated devices (batch 8: one image per device) against the
    1-device pairs (batch 4): the same images, to float32 rounding (DESIGN §6)."""
    out = str(tmp_path / "p8")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-m", "pixelflow_jax.reflow", "pairs", "--ckpt", teacher[0],
         "--out", out, "--num", str(NUM), "--batch", "8", "--seed", str(SEED), "--cfg",
         str(GUIDANCE), "--steps", *map(str, STEPS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images/s" in proc.stderr and "s left" in proc.stderr
    with open(os.path.join(out, "pairs.json")) as f:
        record = json.load(f)
    assert record["devices"] == 8 and record["batch"] == 8
    eight, one = open_pairs(out), open_pairs(pairs_dir)
    assert eight.teacher == dict(one.teacher, checkpoint=os.path.abspath(teacher[0]))
    for a, b in zip(all_ends(eight), all_ends(one)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    for s in range(STAGES):
        idx = np.arange(NUM)
        np.testing.assert_allclose(eight.starts(s, idx), one.starts(s, idx), rtol=0, atol=1e-4)


def test_command_line_errors(teacher, pairs_dir, tmp_path, capsys):
    def run(*argv):
        code = reflow.main(list(argv))
        return code, capsys.readouterr().err.strip().splitlines()

    code, err = run("pairs", "--out", str(tmp_path / "x"), "--num", "0")
    assert code == 2 and len(err) == 1 and "--num must be an integer >= 1" in err[0]
    code, err = run("pairs", "--num", "5")
    assert code == 2 and "--out" in err[-1]
    # The fixture's folder with other settings (guidance) is refused in one line.
    code, err = run("pairs", "--ckpt", teacher[0], "--out", pairs_dir, "--num", str(NUM),
                    "--batch", str(BATCH), "--seed", str(SEED), "--steps", "3", "2", "2",
                    "--cfg", "2")
    assert code == 2 and len(err) == 1 and "other settings (teacher" in err[0]
    code, err = run("straightness", "--ckpt", str(tmp_path / "missing"))
    assert code == 2 and len(err) == 1


# --------------------------------------------------------------------------- straightness

SCHEDULE = CascadeSchedule(STAGES)
SIDES = (2, 4, 8)


def _t_of_T(T, st, xp):
    """A stage's time t from the model timestep T of the Euler grid (DESIGN §3, shift 1)."""
    return 0.999 * (T - st.T_first) / (st.T_last - st.T_first)


def straight_field(s, target):
    """v = (target - x) / (1 - t): Euler on the official grid stays on the line from the
    stage's start to ``target`` (every step's velocity is target - start)."""
    st = SCHEDULE.stages[s]
    return lambda x, T, cond, xp: (target[s] - x) / (1 - _t_of_T(T, st, xp))


def curved_field(s, target):
    return lambda x, T, cond, xp: (-0.7 * x + xp.sin(T / 50 + s) * cond[:, None, None, None]
                                   + 0.3 * xp.tanh(x) ** 2)


def numpy_straightness(make_field, init, blocks, cond, target, steps):
    """The DESIGN §11 definition in float64, two passes: the Euler trajectory's velocities,
    then sum_i w_i ||v_i - (x_end - x_start) / sum dt||^2 / d and ||.||^2 / d per image."""
    x = init.astype(np.float64)
    dev, disp = [], []
    for s, st in enumerate(SCHEDULE.stages):
        if s:
            x = st.alpha * x.repeat(2, axis=1).repeat(2, axis=2) + st.beta * blocks[s - 1]
        T, t = SCHEDULE.inference_timesteps(s, steps[s])
        dt = np.diff(t)
        field, start, vs = make_field(s, target), x.copy(), []
        for i in range(steps[s]):
            v = field(x, T[i], cond, np)
            vs.append(v)
            x = x + dt[i] * v
        vbar = (x - start) / dt.sum()
        d = x[0].size
        dev.append(sum(w * ((v - vbar) ** 2).sum(axis=(1, 2, 3)) for w, v in
                       zip(dt / dt.sum(), vs)) / d)
        disp.append((vbar ** 2).sum(axis=(1, 2, 3)) / d)
    return np.array(dev), np.array(disp)


@pytest.mark.parametrize("kind", ["straight", "curved"])
def test_straightness_against_numpy(kind):
    rng = np.random.default_rng(3)
    B, C, steps = 3, 2, [6, 4, 5]
    init = rng.standard_normal((B, SIDES[0], SIDES[0], C)).astype(np.float32)
    blocks = [rng.standard_normal((B, r, r, C)).astype(np.float32) for r in SIDES[1:]]
    target = [rng.standard_normal((B, r, r, C)).astype(np.float32) for r in SIDES]
    cond = np.array([1.0, -0.5, 2.0], np.float32)
    make_field = straight_field if kind == "straight" else curved_field
    solver = reflow.StraightnessEuler()
    inputs = solver.inputs(SCHEDULE, steps, 1.0)
    alphas = [st.alpha for st in SCHEDULE.stages]
    betas = [st.beta for st in SCHEDULE.stages]
    velocity_for_stage = lambda s: (lambda x, T, c: make_field(s, target)(x, T, c, jnp))

    def run(solver, init, blocks, cond, inputs):
        return run_cascade(solver, velocity_for_stage, init, [blocks], cond, inputs,
                           alphas=alphas, betas=betas, trace=True)

    x, _, trace = jax.jit(lambda *a: run(solver, *a))(init, blocks, cond, inputs)
    dev = np.array([np.asarray(a["deviation"]) for a in trace.aux])
    disp = np.array([np.asarray(a["displacement"]) for a in trace.aux])
    want_dev, want_disp = numpy_straightness(make_field, init, blocks, cond, target, steps)
    np.testing.assert_allclose(disp, want_disp, rtol=1e-4)
    if kind == "straight":
        assert np.all(want_dev <= 1e-20 * want_disp)  # the oracle: exactly straight
        assert np.all(dev <= 1e-6 * disp)             # float32 rounding only
        assert np.all(disp > 0.1)
    else:
        assert np.all(want_dev > 0.05 * want_disp)
        np.testing.assert_allclose(dev, want_dev, rtol=1e-5)
    # The same trajectory as the plain Euler solver.
    euler = Euler()
    x_euler, _ = jax.jit(lambda i, b, c, t: run_cascade(
        euler, velocity_for_stage, i, [b], c, t, alphas=alphas, betas=betas))(
        init, blocks, cond, euler.inputs(SCHEDULE, steps, 1.0))
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_euler), rtol=0, atol=1e-6)


def test_measure_straightness_of_the_teacher(probe, pairs_dir):
    """The model path: batches with padding rows, guidance, labels. With the pairs' own
    steps, vbar is the stage's displacement ends - starts, read back from the pairs."""
    result = reflow.measure_straightness(probe, NUM, seed=SEED, guidance=GUIDANCE,
                                         steps=STEPS, batch_size=BATCH)
    pairs, idx = open_pairs(pairs_dir), np.arange(NUM)
    for s in range(STAGES):
        delta = pairs.ends(s, idx).astype(np.float64) - pairs.starts(s, idx)
        want = np.mean((delta ** 2).reshape(NUM, -1).mean(axis=1))
        assert result.displacement[s] == pytest.approx(want, rel=1e-4)
        assert result.deviation[s] > 0
        assert result.relative[s] == pytest.approx(result.deviation[s] / want, rel=1e-4)
    table = reflow.format_straightness(result, pairs.resolutions)
    assert len(table.splitlines()) == STAGES + 1


def test_straightness_command_line(teacher, probe, capsys):
    """The command prints a per-stage table and, with --json, the numbers the library
    measures with the same images, steps and guidance."""
    code = reflow.main(["straightness", "--ckpt", teacher[0], "--num", str(NUM), "--batch",
                        str(BATCH), "--seed", str(SEED), "--cfg", str(GUIDANCE), "--steps",
                        *map(str, STEPS), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[0].split() == ["stage", "side", "S", "|vbar|^2", "S/|vbar|^2"]
    assert [line.split()[:2] for line in out[1:4]] == [["1", "4"], ["2", "8"], ["3", "16"]]
    got = json.loads(out[-1])
    want = reflow.measure_straightness(probe, NUM, seed=SEED, guidance=GUIDANCE, steps=STEPS,
                                       batch_size=BATCH)
    assert got["steps"] == STEPS and got["images"] == NUM and got["guidance"] == GUIDANCE
    np.testing.assert_allclose(got["deviation"], want.deviation, rtol=1e-5)
    np.testing.assert_allclose(got["displacement"], want.displacement, rtol=1e-6)
