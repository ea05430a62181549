"""The cascade schedule against DESIGN §3's check values and the independent oracle."""

import numpy as np
import pytest

import torch_reference as ref
from pixelflow_jax.errors import UserError
from pixelflow_jax.scheduler import CascadeSchedule

S = CascadeSchedule()


def test_stage_bounds_match_spec():
    assert [st.start_t for st in S.stages] == pytest.approx([0, 1 / 7, 1 / 3, 0.6])
    assert [st.original_start_t for st in S.stages] == [0, 0.25, 0.5, 0.75]
    assert [st.end_t for st in S.stages] == [0.25, 0.5, 0.75, 1.0]
    slices = [(S.train_timesteps(s)[0], S.train_timesteps(s)[-1]) for s in range(4)]
    np.testing.assert_allclose(slices, [(0, 174.825), (175, 425.749), (426, 718.707), (719, 999)])
    assert all(len(S.train_timesteps(s)) == 1000 for s in range(4))
    assert [st.alpha for st in S.stages[1:]] == pytest.approx([0.5714, 0.6667, 0.8], abs=1e-4)
    assert [st.beta for st in S.stages[1:]] == pytest.approx([0.7423, 0.5774, 0.3464], abs=1e-4)
    assert [st.downscale for st in S.stages] == [8, 4, 2, 1]


def test_inference_timesteps_check_values():
    T, t = S.inference_timesteps(0, 10, 1.0)
    assert T == pytest.approx(np.linspace(0, 174.825, 10))
    assert t == pytest.approx(list(np.linspace(0, 0.999, 10)) + [1.0])
    T, t = S.inference_timesteps(2, 7, 3.0)
    assert T == pytest.approx([426, 444.2919, 467.8033, 499.1402, 542.9892, 608.7135, 718.1228],
                              abs=1e-4)
    assert t[-1] == 1.0 and len(t) == 8


def test_schedule_agrees_with_oracle():
    for st, o in zip(S.stages, ref.stage_schedule()):
        assert (st.T_first, st.T_last) == pytest.approx((o["T_first"], o["T_last"]), abs=1e-9)
        assert st.start_t == pytest.approx(o["start_t"], abs=1e-12)
        if st.index:
            assert (st.alpha, st.beta) == pytest.approx((o["alpha"], o["beta"]), abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(10):
        s, n, shift = int(rng.integers(4)), int(rng.integers(1, 40)), float(rng.uniform(0.3, 5))
        T, t = S.inference_timesteps(s, n, shift)
        T_ref, t_ref = ref.inference_timesteps(ref.stage_schedule()[s], n, shift)
        np.testing.assert_allclose(T, T_ref, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(t, t_ref, rtol=1e-12, atol=1e-12)


def test_euler_tables_are_padded_float32():
    tab = S.euler_tables([3, 1, 2, 5], shift=2.0, max_steps=6)
    assert tab.T.shape == tab.dt.shape == (4, 6) and tab.T.dtype == np.float32
    assert list(tab.num_steps) == [3, 1, 2, 5]
    for s, n in enumerate([3, 1, 2, 5]):
        assert np.all(tab.dt[s, n:] == 0) and np.all(tab.T[s, n:] == 0)
        assert tab.dt[s, :n].sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-6)  # t: 0 -> 1
        _, t = S.inference_timesteps(s, n, 2.0)
        # dt is the float32 difference of float32 times, as the official scheduler's step.
        np.testing.assert_array_equal(tab.dt[s, :n], np.diff(t.astype(np.float32)))


def test_bad_steps_and_resolutions():
    with pytest.raises(UserError, match="must be >= 1"):
        S.euler_tables(0)
    with pytest.raises(UserError, match="one per stage"):
        S.euler_tables([1, 2])
    with pytest.raises(UserError, match="exceed the compiled maximum"):
        S.euler_tables(12, max_steps=10)
    with pytest.raises(UserError, match="shift must be > 0"):
        S.inference_timesteps(0, 5, 0.0)
    assert S.stage_resolutions(256, 4) == (32, 64, 128, 256)
    with pytest.raises(UserError, match="multiple of 2\\^3 x 4 = 32"):
        S.stage_resolutions(100, 4)


def test_guidance_weights():
    assert S.guidance_weights() == pytest.approx([0, 1 / 6, 2 / 3, 1])
    three = CascadeSchedule(3).guidance_weights()
    assert three[0] == 0 and three[-1] == 1 and 1 / 6 < three[1] < 2 / 3
    assert CascadeSchedule(1).guidance_weights() == (1.0,)
