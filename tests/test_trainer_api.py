"""The trainer's public pieces (state, step, optimizer against PyTorch's AdamW), and
Trainer.run's stops and starts in process: SIGTERM, a non-finite loss, a save cut by a kill,
a warm-up longer than the run."""

import io
import json
import logging
import os
import signal

import jax
import numpy as np
import optax
import pytest
import torch

from conftest import ROOT
from pixelflow_jax.config import load_config
from pixelflow_jax.trainer import Trainer, learning_rate_schedule, optimizer

CONFIG = os.path.join(ROOT, "configs", "pixelflow_tiny_train.yaml")
# Clipping active (gradient norms are ~0.3), weight decay on, a 1-step warm-up then cosine to 0.
STEP_SETTINGS = ["train.lr=1e-2", "train.weight_decay=0.1", "train.grad_clip=0.05",
                 "train.ema_decay=0.9", "train.warmup_steps=1", "train.schedule=cosine"]
TOTAL = 3


@pytest.fixture(scope="module")
def step_setup(tmp_path_factory):
    """A tiny trainer, its optimizer for a 3-step run, and the step compiled from the
    abstract state and batch alone (as bench/bench_train.py --compile-only does)."""
    cfg = load_config(CONFIG, STEP_SETTINGS)
    trainer = Trainer(cfg, str(tmp_path_factory.mktemp("unused")))
    lr = learning_rate_schedule(cfg.train, TOTAL)
    tx = optimizer(cfg.train, lr)
    graphdef, abstract = trainer.create_train_state(tx, abstract=True)
    step_fn = trainer.make_train_step(graphdef, tx, lr, abstract)
    compiled = step_fn.lower(abstract, trainer.abstract_batch()).compile()
    return trainer, tx, graphdef, abstract, compiled


def random_state(trainer, tx, abstract, seed=0):
    """Normal-scale parameters (every layer active, unlike the zero-output initialisation)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32),
                          abstract["params"])
    state = {"step": np.zeros((), np.int32), "params": params, "ema": params,
             "opt_state": tx.init(params)}
    return jax.device_put(state, trainer.state_shardings(state))


def random_batch(trainer, seed=1):
    rng = np.random.default_rng(seed)
    B, R = trainer.global_batch, trainer.cfg.data.resolution
    return trainer.global_batch_arrays({
        "images": rng.integers(0, 256, (B, R, R, 3), dtype=np.uint8),
        "labels": rng.integers(0, trainer.cfg.params.num_classes, B)})


def test_abstract_state_describes_the_concrete_one(step_setup):
    trainer, tx, _, abstract, _ = step_setup
    _, state = trainer.create_train_state(tx)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype, a.sharding) == (c.shape, c.dtype, c.sharding)
    assert int(state["step"]) == 0
    for p, e in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["ema"])):
        np.testing.assert_array_equal(p, e)  # the EMA starts as a copy (DESIGN §5)


def test_optimizer_matches_torch_adamw_with_clipping_and_schedule():
    """optimizer() and learning_rate_schedule() against torch.optim.AdamW after
    clip_grad_norm_, with a hand-written warm-up and cosine, in float64."""
    cfg = load_config(CONFIG, STEP_SETTINGS).train
    lr = learning_rate_schedule(cfg, TOTAL)
    tx = optimizer(cfg, lr)
    rng = np.random.default_rng(0)
    shapes = {"w": (7, 5), "b": (5,), "table": (4, 3)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
             for _ in range(TOTAL)]
    grads[2]["table"][1] = 0.0  # a row no label used: moves by weight decay alone
    # Warm-up of 1 step (optax's index 0 has rate 0), then cosine from lr to 0 over 2 steps.
    want_lr = [0.0, cfg.lr, cfg.lr * 0.5 * (1 + np.cos(np.pi / 2))]
    theta = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
             for k, v in params.items()}
    opt = torch.optim.AdamW(theta.values(), lr=0.0, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)
    for k, g in enumerate(grads):
        np.testing.assert_allclose(float(lr(k)), want_lr[k], rtol=1e-6, atol=1e-12)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        for name, t in theta.items():
            t.grad = torch.tensor(g[name], dtype=torch.float64)
        norm = float(torch.nn.utils.clip_grad_norm_(list(theta.values()), cfg.grad_clip))
        assert norm > cfg.grad_clip  # the clipping is exercised
        opt.param_groups[0]["lr"] = want_lr[k]
        opt.step()
        for name, t in theta.items():
            np.testing.assert_allclose(params[name], t.detach().numpy(), rtol=1e-5,
                                       atol=1e-7, err_msg=f"{name} after step {k + 1}")


def test_train_step_compiled_from_abstract_inputs(step_setup):
    """The program bench_train --compile-only builds runs on concrete arrays: the step
    counter, the rate of the schedule, the EMA update and finite metrics."""
    trainer, tx, _, abstract, compiled = step_setup
    d, base = trainer.cfg.train.ema_decay, trainer.cfg.train.lr
    state = random_state(trainer, tx, abstract)
    for k in range(2):
        before = jax.device_get(state)  # the step donates its input
        state, metrics = compiled(state, random_batch(trainer, seed=k))
        after = jax.device_get(state)
        assert bool(metrics["ok"]) and int(after["step"]) == k + 1
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
        np.testing.assert_allclose(float(metrics["lr"]), [0.0, base][k], rtol=1e-6)
        moved = any(not np.array_equal(a, b) for a, b in
                    zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"])))
        assert moved == (k == 1)  # the first step's rate is 0 (warm-up)
        for e1, e0, p1 in zip(*(jax.tree.leaves(t) for t in
                                (after["ema"], before["ema"], after["params"]))):
            np.testing.assert_allclose(e1, d * e0.astype(np.float64) + (1 - d) * p1,
                                       rtol=1e-6, atol=1e-7)


def test_a_non_finite_step_leaves_the_state_untouched(step_setup):
    trainer, tx, _, abstract, compiled = step_setup
    state = jax.tree.map(np.array, jax.device_get(random_state(trainer, tx, abstract)))
    first = jax.tree.leaves(state["params"])[0]
    first[(0,) * first.ndim] = np.nan
    before = jax.tree.map(np.copy, state)
    state = jax.device_put(state, trainer.state_shardings(state))
    after, metrics = compiled(state, random_batch(trainer))
    assert not bool(metrics["ok"]) and not np.isfinite(float(metrics["loss"]))
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(after))):
        np.testing.assert_array_equal(a, b)  # NaN == NaN here: bit for bit the same state
    assert int(after["step"]) == 0


# ----------------------------------------------------------------------------- Trainer.run


def run_trainer(out, root, *overrides, stop_after=None, stream=None):
    cfg = load_config(CONFIG, [f"data.root={root}", *overrides])
    stream = stream if stream is not None else io.StringIO()
    result = Trainer(cfg, str(out), stream=stream).run(stop_after)
    return result, stream.getvalue()


def logged_steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def saved_steps(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


class TermAt(io.StringIO):
    """The progress stream: sends this process SIGTERM once step ``n`` is logged, and lists
    the checkpoint folder when the trainer says the SIGTERM save is done."""

    def __init__(self, n, ckpt_dir):
        super().__init__()
        self.n, self.ckpt_dir, self.at_report = n, ckpt_dir, None

    def write(self, text):
        if f" step {self.n}/" in text:
            os.kill(os.getpid(), signal.SIGTERM)
        if text.startswith("SIGTERM: saved step"):
            self.at_report = sorted(os.listdir(self.ckpt_dir))
        return super().write(text)


def test_sigterm_returns_preempted_once_the_save_is_committed(shapes_folder, tmp_path):
    out = tmp_path / "run"
    stream = TermAt(2, out / "checkpoints")
    calls = []
    outer = signal.signal(signal.SIGTERM, lambda *_: calls.append(1))  # instead of dying
    try:
        handler = signal.getsignal(signal.SIGTERM)
        # warmup 49 of 50: the peak rate is reached at the last step, so no warning.
        result, err = run_trainer(out, shapes_folder, "train.steps=50", "train.save_every=1000",
                                  "train.warmup_steps=49", stream=stream)
        assert signal.getsignal(signal.SIGTERM) is handler  # the trainer's handler is gone
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert calls == []  # the trainer caught it
    # The signal lands while step 2 is logged; step 3 runs, then saves and stops.
    assert (result.status, result.step) == ("preempted", 3)
    assert stream.at_report == ["3"]  # committed (no .orbax-checkpoint-tmp) before the report
    assert sorted(logged_steps(out)) == [1, 2, 3]
    assert result.last_loss == logged_steps(out)[3]["loss"]
    assert "warm-up" not in err


def test_leftover_save_removed_quietly_long_warmup_warned_nan_stops_before_saving(
        shapes_folder, tmp_path, caplog):
    """One troubled run: a save cut by kill -9 is left over, the warm-up outlasts the run,
    and the loss turns non-finite between a log and a save."""
    import orbax.checkpoint as ocp

    out = tmp_path / "run"
    # What kill -9 during the save of step 2 leaves: orbax's folder, never committed. Saving
    # step 2 again used to log "WARNING:absl:Attempted to create temporary directory ...".
    partial = out / "checkpoints" / "2.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    (partial / "ocdbt.process_0").write_bytes(b"cut short")
    caplog.set_level(logging.INFO)
    # The rate ramps 0, 1e30/5, ...: step 2's update blows the weights up and a later loss is
    # not finite. Saves every 2 steps, logs every 5: the NaN is first seen at a save.
    result, err = run_trainer(out, shapes_folder, "train.steps=5", "train.warmup_steps=5",
                              "train.lr=1e30", "train.grad_clip=1e30", "train.save_every=2",
                              "train.log_every=5")
    lines = err.splitlines()
    assert [line for line in lines if "incomplete checkpoint" in line] == \
        ["removed an incomplete checkpoint from an interrupted save (step 2)"]
    absl = [r.getMessage() for r in caplog.records
            if r.name == "absl" and r.levelno >= logging.WARNING]
    assert absl == []
    # lr(4) = 4/5 of train.lr: the last step of the run is still in the warm-up.
    warned = [line for line in lines if "never leaves warm-up" in line]
    assert len(warned) == 1 and "train.warmup_steps = 5" in warned[0], err
    assert "8.00e+29" in warned[0]

    assert result.status == "nan", err
    bad = int(err.split("non-finite loss at step ")[1].split()[0])
    assert bad >= 3 and result.step == bad - 1
    assert sorted(logged_steps(out)) == list(range(1, bad))  # nothing from the NaN on
    kept = saved_steps(out)
    assert kept == ["2"], kept  # no leftover folder, no save past the NaN
    assert "The last checkpoint (step 2) is intact" in err
    state = ocp.StandardCheckpointer().restore(out / "checkpoints" / "2" / "state")
    assert int(state["step"]) == 2  # the checkpoint holds its own step's state
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(state["params"]))
