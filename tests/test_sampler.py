"""The jitted Euler cascade against the oracle, batch invariance, and no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from conftest import nchw, rel_err
from pixelflow_jax.errors import UserError
from pixelflow_jax.noise import draw_cascade_noise
from pixelflow_jax.sampling import Sampler, to_images
from pixelflow_jax.scheduler import CascadeSchedule

SCHEDULE = CascadeSchedule()
LABELS = np.array([1, 4, 9])


@pytest.fixture(scope="module")
def sampler(c2i):
    return Sampler(c2i.model(), SCHEDULE, 32, max_steps=4)


@pytest.fixture(scope="module")
def noise(sampler):
    return draw_cascade_noise(3, jnp.arange(3), sampler.resolutions, 3, SCHEDULE.gamma)


def oracle_cascade(pair, noise, **kwargs):
    return ref.euler_cascade(pair.sd, pair.params, nchw(noise.init),
                             [nchw(b) for b in noise.blocks], **kwargs).numpy()


@pytest.mark.parametrize("guidance, steps, shift", [
    (4.0, [3, 2, 1, 4], 1.0),   # stage-wise guidance 1, 1.5, 3, 4
    (0.0, 2, 2.0),              # official "no guidance": conditional only
    (1.0, 3, 3.0),              # g_s = 1 everywhere: our skip of the unconditional pass
    (0.5, 2, 1.0),              # 0 < g < 1 still guides (extrapolates towards u)
])
def test_class_cascade_matches_oracle(c2i, sampler, noise, guidance, steps, shift):
    got = sampler.generate_from_noise(noise, labels=LABELS, guidance=guidance, steps=steps,
                                      shift=shift)
    want = oracle_cascade(c2i, noise, guidance=guidance, steps=steps, shift=shift,
                          class_labels=torch.tensor(LABELS))
    assert rel_err(nchw(got), want) <= 1e-4


def test_text_cascade_matches_oracle(t2i):
    sampler = Sampler(t2i.model(), SCHEDULE, 32)
    rng = np.random.default_rng(0)
    ctx, null = rng.standard_normal((2, 5, 12)), rng.standard_normal((1, 5, 12))
    mask, null_mask = np.ones((2, 5)), np.array([[1, 1, 0, 0, 0]])
    mask[1, 3:] = 0
    noise = draw_cascade_noise(0, jnp.arange(2), sampler.resolutions, 3, SCHEDULE.gamma)
    got = sampler.generate_from_noise(noise, guidance=3.0, steps=2, shift=2.0,
                                      context=jnp.asarray(ctx), context_mask=mask,
                                      null_context=jnp.asarray(null), null_context_mask=null_mask)
    t = torch.tensor
    want = oracle_cascade(t2i, noise, guidance=3.0, steps=2, shift=2.0, context=t(ctx),
                          context_mask=t(mask), null_context=t(null),
                          null_context_mask=t(null_mask))
    assert rel_err(nchw(got), want) <= 1e-4


def test_guidance_one_skips_the_unconditional_pass(sampler, noise):
    run = lambda g: np.asarray(sampler.generate_from_noise(noise, labels=LABELS, guidance=g,
                                                           steps=2))
    # g = 1 and g = 0 both take the conditional-only branch: bit-identical.
    np.testing.assert_array_equal(run(1.0), run(0.0))
    assert not np.allclose(run(1.0), run(2.0))


def test_image_does_not_depend_on_batch(sampler):
    big = np.asarray(sampler.generate(11, np.arange(6), labels=np.arange(6), steps=2))
    small = np.asarray(sampler.generate(11, np.array([4, 1]), labels=np.array([4, 1]), steps=2))
    # Same noise and labels; XLA's CPU matmul blocking varies with the batch size, so
    # values agree to float32 rounding rather than bit for bit.
    np.testing.assert_allclose(small, big[[4, 1]], atol=1e-4)
    other_seed = np.asarray(sampler.generate(12, np.array([4, 1]), labels=np.array([4, 1]),
                                             steps=2))
    assert np.abs(other_seed - small).mean() > 0.1


def test_values_never_recompile(sampler):
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) \
        if event == "/jax/core/compile/backend_compile_duration" else None
    kwargs = dict(steps=[4, 3, 2, 1])
    jax.block_until_ready(sampler.generate(0, np.arange(3), labels=LABELS, **kwargs))
    before = sampler.num_compilations
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for seed, g, shift, labels, steps in [(1, 2.0, 1.0, [0, 1, 2], [4, 3, 2, 1]),
                                              (2, 0.0, 3.0, [5, 5, 5], [1, 1, 1, 1]),
                                              (3, 7.5, 0.5, [9, 8, 7], [4, 4, 4, 4]),
                                              (4, 1.0, 2.0, [2, 3, 4], 3)]:
            jax.block_until_ready(sampler.generate(seed, np.arange(3), labels=np.array(labels),
                                                   guidance=g, shift=shift, steps=steps))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and sampler.num_compilations == before


def test_compiled_ahead_from_shapes_alone(sampler):
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) \
        if event == "/jax/core/compile/backend_compile_duration" else None
    before = sampler.num_compilations
    assert sampler.compile(5, steps=2) > 0 and sampler.num_compilations == before + 1
    assert sampler.compile(5, steps=[4, 1, 1, 1]) == 0.0  # same shapes: the same program
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = sampler.generate(3, np.arange(5), labels=np.arange(5), steps=3)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and sampler.num_compilations == before + 1
    assert out.shape == (5, 32, 32, 3)


def test_lowered_without_weights(c2i, t2i):
    from pixelflow_jax.model import abstract_model
    lowered = Sampler(abstract_model(c2i.config.params), SCHEDULE, 32).lower(2, steps=3)
    x, stats = lowered.out_info
    assert x.shape == (2, 32, 32, 3) and stats.evaluations.shape == (4, 2)
    text = Sampler(abstract_model(t2i.config.params), SCHEDULE, 32, solver="dopri5")
    assert text.lower(2, context_length=5).out_info[0].shape[0] == 2
    with pytest.raises(UserError, match="needs context_length"):
        text.lower(2)


def test_bad_requests(c2i, sampler):
    with pytest.raises(UserError, match="outside \\[0, 10\\)"):
        sampler.generate(0, [0], labels=np.array([11]), steps=2)
    with pytest.raises(UserError, match="guidance must be"):
        sampler.generate(0, [0], labels=np.array([1]), guidance=-1.0, steps=2)
    with pytest.raises(UserError, match="exceed the compiled maximum 4"):
        sampler.generate(0, [0], labels=np.array([1]), steps=5)
    with pytest.raises(UserError, match="seed must be"):
        sampler.generate(-1, [0], labels=np.array([1]), steps=2)
    with pytest.raises(UserError, match="multiple of 2\\^3 x 2 = 16"):
        Sampler(c2i.model(), SCHEDULE, 20)


def test_to_images_rounds_like_the_official_script():
    x = jnp.array([-3.0, -1.0, 0.0, 0.002, 1.0, 5.0])
    np.testing.assert_array_equal(to_images(x), [0, 0, 128, 128, 255, 255])
