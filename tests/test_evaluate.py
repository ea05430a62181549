"""evaluate.py and pixelflow_jax.evaluate_run: reading sets, sharded features, the statistics
cache, the scores against the independent oracle of test_adm_metrics, and bad input.

Most tests inject a small per-image feature network (FakeInception: block means of the image
through fixed random layers, with the FID Inception's output names) so they run in seconds;
the end-to-end tests at the bottom run the real network (pixelflow_jax.inception) with random
calibrated weights (tests/inception_fixtures.py).
"""

import json
import os
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import evaluate
from conftest import ROOT
from pixelflow_jax import cli, evaluate_run
from pixelflow_jax.evaluate_run import EvaluateRequest
from test_adm_metrics import oracle_fid, oracle_fid_from_stats, oracle_is, oracle_pr

POOL, SPATIAL, CLASSES = 64, 48, 32
SPLIT = 10


class FakeOutputs(NamedTuple):
    pool: jax.Array
    spatial: jax.Array
    logits: jax.Array


def fake_weights(seed=0):
    rng = np.random.default_rng(seed)
    return dict(wp=rng.normal(0, 48 ** -0.5, (48, POOL)), bp=rng.normal(0, 0.1, POOL),
                ws=rng.normal(0, 48 ** -0.5, (48, SPATIAL)),
                wl=rng.normal(0, POOL ** -0.5, (POOL, CLASSES)) * 40)


class FakeInception(nnx.Module):
    """Per-image features: 4x4 block means of each channel (48 values) -> ReLU layers."""

    def __init__(self, seed=0):
        w = fake_weights(seed)
        self.wp, self.bp = nnx.Param(jnp.float32(w["wp"])), nnx.Param(jnp.float32(w["bp"]))
        self.ws, self.wl = nnx.Param(jnp.float32(w["ws"])), nnx.Param(jnp.float32(w["wl"]))

    def __call__(self, images):
        b, h, wd, c = images.shape
        x = images.astype(jnp.float32).reshape(b, 4, h // 4, 4, wd // 4, c).mean((2, 4))
        x = x.reshape(b, 48) / 255.0
        hi = jax.lax.Precision.HIGHEST
        pool = jax.nn.relu(jnp.dot(x, self.wp[...], precision=hi) + self.bp[...])
        spatial = jax.nn.relu(jnp.dot(x, self.ws[...], precision=hi))
        return FakeOutputs(pool, spatial, jnp.dot(pool, self.wl[...], precision=hi))


def numpy_features(images, seed=0):
    """FakeInception in float64 NumPy: the oracle for the pipeline's features."""
    w = fake_weights(seed)
    b, h, wd, c = images.shape
    x = images.astype(np.float64).reshape(b, 4, h // 4, 4, wd // 4, c).mean((2, 4))
    x = x.reshape(b, 48) / 255.0
    pool = np.maximum(x @ w["wp"] + w["bp"], 0)
    return pool, np.maximum(x @ w["ws"], 0), pool @ w["wl"]


def draw_images(seed, n, size=16, lo=40, hi=216):
    """Random colour images whose block means differ between images (base colours in
    [lo, hi): a narrower range is a less diverse set)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(lo, hi, (n, 1, 1, 3))
    rows = rng.integers(-30, 30, (n, size, 1, 1))
    noise = rng.integers(-40, 40, (n, size, size, 3))
    return np.clip(base + rows + noise, 0, 255).astype(np.uint8)


def write_npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return str(path)


def write_pngs(folder, images, names=None):
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(folder, names[i] if names else f"{i:06d}.png"))
    return str(folder)


def request(samples, reference, weights, **kw):
    kw.setdefault("quiet", True)
    return EvaluateRequest(samples=str(samples), reference=str(reference), inception=str(weights),
                           split_size=SPLIT, feature_sizes=(POOL, SPATIAL), **kw)


class Network:
    """The injected network factory; counts how often evaluation had to build it."""

    def __init__(self, seed=0):
        self.seed, self.calls = seed, 0

    def __call__(self, req):
        self.calls += 1
        return FakeInception(self.seed)


@pytest.fixture
def sets(tmp_path):
    samples, ref = draw_images(1, 23, lo=110, hi=256), draw_images(2, 31)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"PK fake weights 1")
    return dict(samples=samples, ref=ref, weights=str(weights),
                samples_npz=write_npz(tmp_path / "samples.npz", arr_0=samples),
                ref_npz=write_npz(tmp_path / "ref.npz", arr_0=ref), tmp=tmp_path)


def oracle_scores(samples_features, ref_features, ref_stats=None, row_batch=10000):
    (sp, ss, sl), (rp, rs, _) = samples_features, ref_features
    if ref_stats is None:
        fid, sfid = oracle_fid(sp, rp), oracle_fid(ss, rs)
    else:
        (mu, sigma), (mu_s, sigma_s) = ref_stats
        x, y = sp.astype(np.float64), ss.astype(np.float64)
        fid = oracle_fid_from_stats(x.mean(0), np.cov(x, rowvar=False), mu, sigma)
        sfid = oracle_fid_from_stats(y.mean(0), np.cov(y, rowvar=False), mu_s, sigma_s)
    p, r, _, _ = oracle_pr(rp, sp, 3, row_batch, row_batch)
    return dict(fid=fid, sfid=sfid, inception_score=oracle_is(sl, SPLIT), precision=p, recall=r)


def assert_scores(scores, want):
    got = scores.as_dict() if hasattr(scores, "as_dict") else scores
    for k in ("fid", "sfid", "inception_score"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    assert (got["precision"], got["recall"]) == (want["precision"], want["recall"])


# --------------------------------------------------------------------------- pipeline


def test_features_come_out_in_order_whatever_the_batch(sets):
    images = evaluate_run.open_images(sets["samples_npz"], "SAMPLES")
    extractor = evaluate_run.Extractor(FakeInception())
    want = numpy_features(sets["samples"])
    by5 = extractor(images, batch=5)  # 23 = 4 x 5 + 3: the last batch is padded
    for got, w in zip(by5, want):
        np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-5)
    by64 = extractor(images, batch=64)
    for a, b in zip(by5, by64):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    extractor(images, batch=5)
    assert extractor._run._cache_size() == 2  # one program per batch shape, no more


def test_scores_match_the_oracle_and_json(sets, capsys):
    out = sets["tmp"] / "scores.json"
    net = Network()
    req = request(sets["samples_npz"], sets["ref_npz"], sets["weights"], batch=5, row_batch=8,
                  json=str(out))
    assert evaluate_run.run_evaluation(req, network=net) == 0
    # the oracle scores the pipeline's own features (checked against NumPy just above)
    extractor = evaluate_run.Extractor(FakeInception())
    f_s = extractor(evaluate_run.open_images(sets["samples_npz"], "S"), batch=5)
    f_r = extractor(evaluate_run.open_images(sets["ref_npz"], "R"), batch=5)
    want = oracle_scores(f_s, f_r, row_batch=8)
    written = json.loads(out.read_text())
    assert sorted(written) == sorted(["fid", "sfid", "inception_score", "precision", "recall"])
    assert_scores(written, want)
    assert written["fid"] > 0.01 and 0 < written["precision"] < 1 and 0 < written["recall"] < 1
    table = capsys.readouterr().out
    for label, key in (("FID", "fid"), ("sFID", "sfid"), ("Inception Score", "inception_score"),
                       ("Precision", "precision"), ("Recall", "recall")):
        line = [row for row in table.splitlines() if row.startswith(label + " ")][0]
        assert float(line.split()[-1]) == pytest.approx(written[key], rel=1e-5)


def test_cache_is_reused_and_invalidated(sets):
    net = Network()
    req = request(sets["samples_npz"], sets["ref_npz"], sets["weights"], batch=8)
    first = evaluate_run.evaluate(req, network=net)
    assert net.calls == 1
    for path in (sets["samples_npz"], sets["ref_npz"]):
        assert os.path.isfile(path + ".adm-stats.npz")
    again = evaluate_run.evaluate(req, network=net)
    assert net.calls == 1 and again == first  # both sets read from their caches
    # a changed sample file: recomputed (and the new scores differ)
    changed = sets["samples"].copy()
    changed[0] = 255 - changed[0]
    write_npz(sets["samples_npz"], arr_0=changed)
    os.utime(sets["samples_npz"], ns=(1, 1))  # a new mtime, whatever the clock's resolution
    third = evaluate_run.evaluate(req, network=net)
    assert net.calls == 2 and third != first
    # other weights: recomputed
    with open(sets["weights"], "wb") as f:
        f.write(b"PK fake weights 2")
    evaluate_run.evaluate(req, network=net)
    assert net.calls == 3
    # no cache: the (valid) caches are neither read nor rewritten, a missing one not written
    cache = sets["samples_npz"] + ".adm-stats.npz"
    os.utime(cache, ns=(5, 5))
    evaluate_run.evaluate(dataclass_replace(req, cache=False), network=net)
    assert net.calls == 4 and os.stat(cache).st_mtime_ns == 5
    os.unlink(cache)
    evaluate_run.evaluate(dataclass_replace(req, cache=False), network=net)
    assert net.calls == 5 and not os.path.exists(cache)


def dataclass_replace(req, **kw):
    import dataclasses
    return dataclasses.replace(req, **kw)


def test_png_folder_and_compressed_npz_read_as_the_npz(sets):
    tmp, samples = sets["tmp"], sets["samples"]
    # numbered names without padding: image order is by number, not by name
    folder = write_pngs(tmp / "pngs", samples, [f"{i}_class{i % 3}.png" for i in range(23)])
    Image.fromarray(samples[0]).save(tmp / "pngs" / ".tmp-deadbeef.png")  # skipped
    (tmp / "pngs" / "run.json").write_text("{}")
    compressed = write_npz(tmp / "c.npz", compressed=True, arr_0=samples)
    net = Network()
    base = evaluate_run.evaluate(request(sets["samples_npz"], sets["ref_npz"], sets["weights"],
                                         batch=4), network=net)
    for path in (folder, compressed):
        s = evaluate_run.open_images(path, "SAMPLES")
        assert s.num_images == 23
        np.testing.assert_array_equal(s.read(np.arange(23)), samples)
        got = evaluate_run.evaluate(request(path, sets["ref_npz"], sets["weights"], batch=4),
                                    network=net)
        assert got == base
    # a reference given as a folder of PNGs too
    ref_folder = write_pngs(tmp / "refpngs", sets["ref"])
    got = evaluate_run.evaluate(request(sets["samples_npz"], ref_folder, sets["weights"]),
                                network=net)
    assert got == base


def test_reference_statistics_are_read_not_recomputed(sets):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(40, POOL)), rng.normal(size=(50, SPATIAL))
    stats = dict(mu=a.mean(0) + 1, sigma=np.cov(a, rowvar=False), mu_s=b.mean(0),
                 sigma_s=np.cov(b, rowvar=False))
    ref = write_npz(sets["tmp"] / "ref_stats.npz", arr_0=sets["ref"], **stats)
    scores = evaluate_run.evaluate(request(sets["samples_npz"], ref, sets["weights"], batch=8),
                                   network=Network())
    extractor = evaluate_run.Extractor(FakeInception())
    f_s = extractor(evaluate_run.open_images(sets["samples_npz"], "S"), batch=8)
    f_r = extractor(evaluate_run.open_images(ref, "R"), batch=8)
    want = oracle_scores(f_s, f_r, ref_stats=((stats["mu"], stats["sigma"]),
                                              (stats["mu_s"], stats["sigma_s"])))
    assert_scores(scores, want)
    assert scores.fid != pytest.approx(oracle_fid(f_s[0], f_r[0]), rel=1e-3)


def test_eight_devices_give_the_one_device_features(tmp_path):
    """Batches sharded over 8 (simulated) devices: each image's features are those of one
    device (a subprocess: the device count is fixed when JAX starts)."""
    images = draw_images(3, 21)
    path = write_npz(tmp_path / "s.npz", arr_0=images)
    code = f"""
import json, sys, numpy as np, jax
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
from test_evaluate import FakeInception
from pixelflow_jax import evaluate_run
ex = evaluate_run.Extractor(FakeInception())
f = ex(evaluate_run.open_images({path!r}, "SAMPLES"), batch=5)
np.save({str(tmp_path / 'eight.npy')!r}, f.pool)
print(json.dumps(dict(devices=jax.device_count(), mesh=ex.mesh.size,
                      batch=ex.global_batch(5, 21))))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == dict(devices=8, mesh=8, batch=8)  # 5 rounded up to the device count
    one = evaluate_run.Extractor(FakeInception())(evaluate_run.open_images(path, "S"), batch=5)
    np.testing.assert_allclose(np.load(tmp_path / "eight.npy"), one.pool, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(one.pool, numpy_features(images)[0], rtol=2e-5, atol=2e-5)


def test_progress_line_reports_images_per_second(sets, capsys):
    import io
    stream = io.StringIO()
    evaluate_run.Extractor(FakeInception())(
        evaluate_run.open_images(sets["samples_npz"], "SAMPLES"), batch=4, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("SAMPLES: 23/23 images, ") and "images/s, done in" in lines[-1]
    assert 2 <= len(lines) <= 11  # a line per tenth at most (not a terminal)


# --------------------------------------------------------------------------- bad input


def one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error: "), err
    return err


def bad_cases(tmp):
    good = draw_images(7, 6)
    return {
        "no arr_0": (write_npz(tmp / "noarr.npz", images=good), None,
                     "has no arr_0 (the images); its keys: images"),
        "float images": (write_npz(tmp / "float.npz", arr_0=good.astype(np.float32)), None,
                         "arr_0 must be uint8 images [N, H, W, 3] (NHWC, RGB), got float32"),
        "grey images": (write_npz(tmp / "grey.npz", arr_0=good[..., 0]), None,
                        "got uint8 [6, 16, 16]"),
        "rgba images": (write_npz(tmp / "rgba.npz", arr_0=np.concatenate(
            [good, good[..., :1]], -1)), None, "got uint8 [6, 16, 16, 4]"),
        "too few": (write_npz(tmp / "few.npz", arr_0=good[:3]), None,
                    "holds 3 image(s); the ADM metrics need at least 4"),
        "resolution": (write_npz(tmp / "big.npz", arr_0=draw_images(8, 6, size=32)), None,
                       "SAMPLES are 32x32 px but REF 16x16 px"),
        "partial stats": (None, write_npz(tmp / "partial.npz", arr_0=good, mu=np.zeros(2048)),
                          "has mu but not sigma, mu_s, sigma_s"),
        "stats shape": (None, write_npz(tmp / "shape.npz", arr_0=good, mu=np.zeros(10),
                                        sigma=np.eye(10), mu_s=np.zeros(2023),
                                        sigma_s=np.eye(2023)),
                        "mu must be a float array of shape [2048], got float64 [10]"),
        "not a zip": (str(tmp / "junk.npz"), None, "is not a readable .npz file"),
        "missing": (str(tmp / "nothing.npz"), None, "no such file or folder"),
        "empty folder": (str(tmp / "empty"), None, "holds no PNG files"),
        "truncated": (str(tmp / "trunc.npz"), None, "is damaged or truncated"),
        "cut short": (str(tmp / "short.npz"), None, "is not a readable .npz file"),
    }


@pytest.mark.parametrize("case", ["no arr_0", "float images", "grey images", "rgba images",
                                  "too few", "resolution", "partial stats", "stats shape",
                                  "not a zip", "missing", "empty folder", "truncated",
                                  "cut short"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"PK")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    (tmp_path / "empty").mkdir()
    full = write_npz(tmp_path / "full.npz", arr_0=draw_images(9, 40))
    data = open(full, "rb").read()
    (tmp_path / "trunc.npz").write_bytes(data[:len(data) // 2] + data[-200:])
    (tmp_path / "short.npz").write_bytes(data[:len(data) // 2])
    good = write_npz(tmp_path / "good.npz", arr_0=draw_images(7, 6))
    samples, ref, message = bad_cases(tmp_path)[case]
    code = evaluate.main([samples or good, ref or good, "--inception", str(weights)])
    assert code == cli.EXIT_USER
    assert message in one_line(capsys)


def test_weights_and_output_mistakes(tmp_path, capsys):
    good = write_npz(tmp_path / "good.npz", arr_0=draw_images(7, 6))
    assert evaluate.main([good, good, "--inception", str(tmp_path / "none.pth")]) == 2
    err = one_line(capsys)
    assert "--inception" in err and "no such file" in err
    html = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    html.write_text("<html>Not Found</html>")  # a failed download
    assert evaluate.main([good, good, "--inception", str(html)]) == 2
    err = one_line(capsys)
    assert str(html) in err and "neither a TensorFlow .pb nor a torch .pth" in err
    assert evaluate.main([good, good, "--inception", good, "--json", "/proc/x.json"]) == 2
    assert "kernel/device filesystem" in one_line(capsys)
    assert evaluate.main([good, good]) == 2
    assert "--inception" in one_line(capsys)


def test_any_resolution_lets_different_sizes_through(tmp_path):
    small = write_npz(tmp_path / "s.npz", arr_0=draw_images(1, 6))
    big = write_npz(tmp_path / "b.npz", arr_0=draw_images(2, 6, size=32))
    weights = tmp_path / "w"
    weights.write_bytes(b"PK")
    scores = evaluate_run.evaluate(request(small, big, weights, any_resolution=True),
                                   network=Network())
    assert np.isfinite(scores.fid)


def test_help_explains_every_flag(capsys):
    assert evaluate.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in evaluate.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help and " ".join(action.help.split())[:30] in text


# --------------------------------------------------------------------------- the real network
# pixelflow_jax.inception with calibrated random weights (tests/inception_fixtures.py). The
# Frechet distances here are checked with a low-rank identity instead of a second sqrtm: for
# centred features A [n1, D], B [n2, D], tr sqrtm(s1 s2) = ||A B^T||_* / sqrt((n1-1)(n2-1)).


def lowrank_fid(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    A, B = a - a.mean(0), b - b.mean(0)
    n1, n2 = len(a), len(b)
    cross = np.linalg.svd(A @ B.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (A ** 2).sum() / (n1 - 1)
                 + (B ** 2).sum() / (n2 - 1) - 2 * cross)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from inception_fixtures import write_random_pth
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    write_random_pth(str(path))
    return str(path)


def test_evaluate_py_end_to_end_with_the_inception_network(tmp_path, inception_weights, capsys):
    from conftest import jit_call
    from pixelflow_jax.inception_weights import load_inception

    samples = draw_images(11, 8, size=32, lo=110, hi=256)
    ref = draw_images(12, 10, size=32)
    folder = write_pngs(tmp_path / "samples", samples)
    ref_npz = write_npz(tmp_path / "ref.npz", arr_0=ref)
    out = tmp_path / "scores.json"
    code = evaluate.main([folder, ref_npz, "--inception", inception_weights, "--json", str(out),
                          "--batch", "4"])
    assert code == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    # the network applied directly, in one batch, and the oracle on its features
    pool, spatial, logits = (np.asarray(a) for a in
                             jit_call(load_inception(inception_weights),
                                      jnp.asarray(np.concatenate([samples, ref]))))
    cached = np.load(folder + ".adm-stats.npz")["pool"]
    np.testing.assert_allclose(cached, pool[:8], rtol=1e-4, atol=1e-5)
    assert got["fid"] == pytest.approx(lowrank_fid(pool[:8], pool[8:]), rel=1e-5)
    assert got["sfid"] == pytest.approx(lowrank_fid(spatial[:8], spatial[8:]), rel=1e-5)
    assert got["inception_score"] == pytest.approx(oracle_is(logits[:8], 5000), rel=1e-5)
    p, r, _, _ = oracle_pr(pool[8:], pool[:8], 3, 10000, 10000)
    assert (got["precision"], got["recall"]) == (p, r)
    assert got["fid"] > 1 and got["sfid"] > 1


def test_unreadable_weights_are_one_line(tmp_path, capsys):
    good = write_npz(tmp_path / "good.npz", arr_0=draw_images(7, 6))
    junk = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    junk.write_bytes(b"PK\x03\x04 this is not a torch file")
    assert evaluate.main([good, good, "--inception", str(junk)]) == 2
    assert str(junk) in one_line(capsys)


def test_sample_py_scores_its_fid_run(tmp_path, monkeypatch, capsys):
    """sample.py --fid-samples N --evaluate REF --inception W on the embedded digits model,
    against the first held-out digits (python -m pixelflow_jax.digits reference). The network
    is the small injected one (the real one's path is the test above: the same code, but two
    2048-wide sqrtm cost ~75 s of CPU)."""
    import sample
    from pixelflow_jax import digits

    ref_full = tmp_path / "digits_ref.npz"
    assert digits.main(["reference", str(ref_full)]) == 0
    full = np.load(ref_full)["arr_0"]
    split = digits.split_digits()
    assert full.shape == (len(split.heldout_y), 32, 32, 3) and full.dtype == np.uint8
    np.testing.assert_array_equal(full[5], digits.digit_to_image(split.heldout_x[5], 32))
    ref = write_npz(tmp_path / "ref24.npz", arr_0=full[:24])
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"PK")
    monkeypatch.setattr(evaluate_run, "load_network", lambda request: FakeInception())
    out = tmp_path / "fid"
    capsys.readouterr()
    code = sample.main(["--fid-samples", "20", "--out", str(out), "--evaluate", ref,
                        "--inception", str(weights), "--steps", "2", "--batch-size", "10"])
    text = capsys.readouterr()
    assert code == 0, text.err
    rows = {line.rsplit(None, 1)[0]: float(line.split()[-1]) for line in text.out.splitlines()
            if line.split() and line.rsplit(None, 1)[0] in evaluate_run.LABELS.values()}
    assert sorted(rows) == sorted(evaluate_run.LABELS.values())
    # the scores are those of the run's .npz against the reference
    drawn = np.load(str(out) + ".npz")["arr_0"]
    assert drawn.shape == (20, 32, 32, 3)
    (sp, ss, sl), (rp, rs, _) = numpy_features(drawn), numpy_features(full[:24])
    assert rows["FID"] == pytest.approx(oracle_fid(sp, rp), rel=1e-4)
    assert rows["sFID"] == pytest.approx(oracle_fid(ss, rs), rel=1e-4)
    assert rows["Inception Score"] == pytest.approx(oracle_is(sl, 5000), rel=1e-4)
    p, r, _, _ = oracle_pr(rp, sp, 3, 10000, 10000)
    assert abs(rows["Precision"] - p) <= 1 / 20 + 1e-6 and abs(rows["Recall"] - r) <= 1 / 24 + 1e-6
    assert os.path.isfile(str(out) + ".npz.adm-stats.npz")


def test_sample_py_checks_the_reference_before_sampling(tmp_path, capsys):
    import sample

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"PK")
    big = write_npz(tmp_path / "big.npz", arr_0=draw_images(1, 6, size=64))
    out = str(tmp_path / "fid")
    cases = [
        (["--fid-samples", "8", "--evaluate", big], "--evaluate needs --inception"),
        (["--fid-samples", "8", "--inception", str(weights)], "--inception is for --evaluate"),
        (["--evaluate", big, "--inception", str(weights)], "add --fid-samples N"),
        (["--fid-samples", "3", "--evaluate", big, "--inception", str(weights)],
         "at least 4 samples"),
        (["--fid-samples", "8", "--evaluate", str(tmp_path / "none.npz"), "--inception",
          str(weights)], "no such file"),
        # the embedded model draws 32 px digits: a 64 px reference is refused up front
        (["--fid-samples", "8", "--evaluate", big, "--inception", str(weights)],
         "holds 64x64 px images but the samples will be 32x32 px"),
    ]
    for flags, message in cases:
        assert sample.main([*flags, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not os.path.exists(out)  # nothing was drawn
