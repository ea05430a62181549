"""Data pipeline: sources, augmentations, and the deterministic resumable loader."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixelflow_jax import data
from pixelflow_jax.data import (CorruptImageError, ImageFolderSource, Loader, augment,
                                center_crop, decode_rgb, open_source, random_resized_crop,
                                resize_short_side)
from pixelflow_jax.errors import UserError

R = 16
SIZES = [(40, 30), (30, 50), (24, 24), (20, 36), (50, 40), (36, 20)]  # (W, H)
CLASSES = ["cat", "ant", "bee"]  # sorted: ant, bee, cat


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    """A gradient plus noise: every crop and flip gives a different array."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    arr = x + rng.integers(0, 50, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """3 classes x 6 images (PNG and JPEG, one nested, one upper-case extension)."""
    root = tmp_path_factory.mktemp("images")
    for c, name in enumerate(CLASSES):
        d = root / name
        (d / "sub").mkdir(parents=True)
        for k, (w, h) in enumerate(SIZES):
            img = noise_image(w, h, seed=10 * c + k)
            if k == 5:
                img.save(d / "sub" / "z.png")
            elif k % 2:
                img.save(d / f"img{k}.JPEG", format="JPEG")
            else:
                img.save(d / f"img{k}.png")
        (d / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def source(folder) -> ImageFolderSource:
    return ImageFolderSource(folder)


@pytest.fixture
def bad_folder(tmp_path) -> str:
    """Like ``folder`` (smaller) plus one non-image and one truncated PNG."""
    for c, name in enumerate(CLASSES):
        d = tmp_path / name
        d.mkdir()
        for k, (w, h) in enumerate(SIZES[:4]):
            noise_image(w, h, seed=10 * c + k).save(d / f"img{k}.png")
    (tmp_path / "ant" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    png = encode(noise_image(30, 30, 99))
    (tmp_path / "cat" / "truncated.png").write_bytes(png[: len(png) // 2])
    return str(tmp_path)


def run(loader: Loader, n: int) -> list[dict]:
    return [loader.next() for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("images", "labels", "indices"):
            np.testing.assert_array_equal(x[k], y[k])


# --------------------------------------------------------------------------- sources


def test_image_folder_order_and_labels(source, folder):
    assert source.class_names == ["ant", "bee", "cat"]
    assert source.num_classes == 3
    assert len(source) == 18  # notes.txt ignored, sub/ and .JPEG included
    rel = [os.path.relpath(p, folder).replace(os.sep, "/") for p in source.paths]
    assert rel[:6] == ["ant/img0.png", "ant/img1.JPEG", "ant/img2.png", "ant/img3.JPEG",
                       "ant/img4.png", "ant/sub/z.png"]
    assert [source.get(i)[1] for i in range(18)] == [0] * 6 + [1] * 6 + [2] * 6
    raw, label = source.get(7)
    assert label == 1
    with open(source.paths[7], "rb") as f:
        assert raw == f.read()
    assert source.describe(7) == source.paths[7]


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        ImageFolderSource(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no class sub-folders"):
        ImageFolderSource(str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="has no images") as e:
        ImageFolderSource(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(UserError, match="not a folder"):
        ImageFolderSource(str(tmp_path / "f.png"))


def test_open_source(folder):
    assert len(open_source("imagefolder", folder, "", None, "train")) == 18
    with pytest.raises(UserError, match="unknown dataset kind"):
        open_source("webdataset", folder, "", None, "train")
    with pytest.raises(UserError, match="root"):
        open_source("imagefolder", None, "", None, "train")


def test_data_imports_without_tfds():
    code = ("import sys; sys.modules['tensorflow_datasets'] = None\n"
            "import pixelflow_jax.data as d\n"
            "try:\n    d.TfdsSource('mnist', None)\n"
            "except d.UserError as e:\n    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    assert "pip install tensorflow-datasets" in out


def _mock_records(n: int) -> list[dict]:
    return [{"image": encode(noise_image(20 + i % 3, 24, i)), "label": i % 10}
            for i in range(n)]


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    records = _mock_records(12)
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records):
        src = open_source("tfds", None, "mnist", None, "train")
        assert isinstance(src, data.TfdsSource)
        assert len(src) == 12 and src.num_classes == 10
        assert src.get(3) == (records[3]["image"], 3)
        with Loader(src, 4, R, seed=1, num_workers=2) as ld:
            batches = run(ld, 4)
    for b in batches:
        assert b["images"].shape == (4, R, R, 3)
        np.testing.assert_array_equal(b["labels"], b["indices"] % 10)
    first = np.concatenate([b["indices"] for b in batches[:3]])
    assert sorted(first) == list(range(12))


def test_tfds_not_prepared(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(UserError, match="not prepared") as e:
        data.TfdsSource("mnist", str(tmp_path), "train")
    msg = str(e.value)
    assert f"tfds build mnist --file_format=array_record --data_dir {tmp_path}" in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- decoding


def test_decode_rgb_modes():
    rgb = noise_image(12, 9, 0)
    out = decode_rgb(encode(rgb))
    assert out.mode == "RGB" and out.size == (12, 9)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(rgb))
    assert decode_rgb(encode(rgb, "JPEG")).mode == "RGB"
    gray = decode_rgb(encode(rgb.convert("L")))
    assert gray.mode == "RGB"
    g = np.asarray(gray)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(7)
    np.testing.assert_array_equal(np.asarray(decode_rgb(encode(rgba))), np.asarray(rgb))


@pytest.mark.parametrize("raw", [b"", b"not an image at all", "truncated-png", "truncated-jpeg"])
def test_decode_rgb_corrupt(raw):
    if raw == "truncated-png":
        full = encode(noise_image(40, 40, 1))
        raw = full[: len(full) // 2]
    elif raw == "truncated-jpeg":
        full = encode(noise_image(40, 40, 1), "JPEG")
        raw = full[: len(full) // 3]
    with pytest.raises(CorruptImageError):
        decode_rgb(raw)
    with pytest.raises(CorruptImageError):
        augment(raw, R, 1.125, False, np.random.default_rng(0))


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("size,short,want", [
    ((40, 30), 18, (24, 18)), ((30, 50), 18, (18, 30)), ((24, 24), 18, (18, 18)),
    ((37, 23), 36, (57, 36)), ((23, 37), 36, (36, 57))])
def test_resize_short_side(size, short, want):
    # Long side = int(short * long / short_old), as torchvision's Resize(int): 36*37/23 = 57.9
    assert resize_short_side(noise_image(*size, 0), short).size == want


def _find_window(out: np.ndarray, big: np.ndarray) -> tuple[int, int, bool] | None:
    h, w = big.shape[:2]
    for flip in (False, True):
        o = out[:, ::-1] if flip else out
        for top in range(h - R + 1):
            for left in range(w - R + 1):
                if np.array_equal(o, big[top:top + R, left:left + R]):
                    return top, left, flip
    return None


def test_random_resized_crop_is_resize_then_crop_then_flip():
    img = noise_image(40, 30, 3)
    # Short side round(16 * 1.4) = round(22.4) = 22; long side int(22 * 40 / 30) = 29.
    big = np.asarray(resize_short_side(img, 22))
    assert big.shape == (22, 29, 3)
    seen = []
    for s in range(40):
        out = random_resized_crop(img, R, 1.4, np.random.default_rng(s))
        assert out.shape == (R, R, 3) and out.dtype == np.uint8
        where = _find_window(out, big)
        assert where is not None, f"seed {s}: output is no crop of the resized image"
        seen.append(where)
    tops, lefts, flips = zip(*seen)
    assert set(tops) <= set(range(7)) and len(set(tops)) > 3
    assert set(lefts) <= set(range(14)) and len(set(lefts)) > 5
    assert 5 < sum(flips) < 35  # flipped for some seeds, not for others
    a = random_resized_crop(img, R, 1.4, np.random.default_rng(123))
    b = random_resized_crop(img, R, 1.4, np.random.default_rng(123))
    np.testing.assert_array_equal(a, b)


def test_random_resized_crop_rng_order():
    # top, left, then flip, all from the one generator
    img = noise_image(30, 40, 5)
    out = random_resized_crop(img, R, 1.125, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    big = np.asarray(resize_short_side(img, 18))
    top = rng.integers(0, big.shape[0] - R + 1)
    left = rng.integers(0, big.shape[1] - R + 1)
    want = big[top:top + R, left:left + R]
    if rng.random() < 0.5:
        want = want[:, ::-1]
    np.testing.assert_array_equal(out, want)


def test_center_crop():
    img = noise_image(R, R, 4)
    arr = np.asarray(img)
    flips = 0
    for s in range(20):
        out = center_crop(img, R, np.random.default_rng(s))
        assert out.shape == (R, R, 3) and out.dtype == np.uint8
        if np.array_equal(out, arr[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, arr)
    assert 0 < flips < 20
    big = center_crop(noise_image(100, 70, 1), R, np.random.default_rng(0))
    assert big.shape == (R, R, 3)
    # 70 >= 2*16 twice: 100x70 -> 50x35 -> 25x17 (BOX), then 17 -> 16: 24x16, crop x 4..20
    small = Image.fromarray(np.asarray(noise_image(100, 70, 1)))
    for _ in range(2):
        small = small.resize((small.size[0] // 2, small.size[1] // 2), resample=Image.BOX)
    small = small.resize((round(25 * 16 / 17), 16), resample=Image.BICUBIC)
    want = np.asarray(small)[:, 4:20]
    rng = np.random.default_rng(0)
    if rng.random() < 0.5:
        want = want[:, ::-1]
    np.testing.assert_array_equal(big, want)


# --------------------------------------------------------------------------- loader


def test_loader_shapes_and_labels(source):
    with Loader(source, 4, R, seed=0, num_workers=2) as ld:
        for b in run(ld, 5):
            assert b["images"].shape == (4, R, R, 3) and b["images"].dtype == np.uint8
            assert b["labels"].dtype == np.int32 and b["indices"].dtype == np.int64
            assert list(b["labels"]) == [source.get(int(i))[1] for i in b["indices"]]


def test_loader_images_depend_only_on_seed_epoch_index(source):
    with Loader(source, 4, R, seed=3, num_workers=2) as ld:
        batches = run(ld, 6)  # crosses into epoch 1 (4 batches per epoch)
    for n, b in enumerate(batches):
        epoch = n // 4
        for img, i in zip(b["images"], b["indices"]):
            rng = np.random.default_rng([3, epoch, int(i), 1])
            np.testing.assert_array_equal(img, augment(source.get(int(i))[0], R, 1.125, False,
                                                       rng))


def test_loader_deterministic_and_seeded(source):
    with Loader(source, 4, R, seed=5, num_workers=3) as a, \
            Loader(source, 4, R, seed=5, num_workers=0) as b, \
            Loader(source, 4, R, seed=6, num_workers=2) as c:
        ra, rb, rc = run(a, 6), run(b, 6), run(c, 6)
    assert_same(ra, rb)
    assert not np.array_equal(ra[0]["indices"], rc[0]["indices"])


def test_loader_epoch_order(source):
    with Loader(source, 3, R, seed=2, num_workers=2) as ld:
        batches = run(ld, 12)
    idx = [np.concatenate([b["indices"] for b in batches[6 * e:6 * e + 6]]) for e in (0, 1)]
    for e in (0, 1):
        assert sorted(idx[e]) == list(range(18))  # every index exactly once per epoch
        np.testing.assert_array_equal(idx[e], np.random.default_rng([2, e]).permutation(18))
    with Loader(source, 4, R, seed=2, num_workers=0) as ld:
        batches = run(ld, 5)
        state = ld.state()
    # 18 // 4 = 4 batches; the last 2 images are dropped, then epoch 1 begins
    first = np.concatenate([b["indices"] for b in batches[:4]])
    np.testing.assert_array_equal(first, np.random.default_rng([2, 0]).permutation(18)[:16])
    np.testing.assert_array_equal(batches[4]["indices"],
                                  np.random.default_rng([2, 1]).permutation(18)[:4])
    assert state == {"epoch": 1, "position": 4, "skipped": 0}


def test_loader_hosts_disjoint(source):
    perm = np.random.default_rng([0, 0]).permutation(18)
    seen = []
    for p in (0, 1):
        with Loader(source, 3, R, num_workers=1, process_index=p, process_count=2) as ld:
            idx = np.concatenate([b["indices"] for b in run(ld, 3)])
        np.testing.assert_array_equal(idx, perm[p::2])
        seen.append(set(idx.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(18))


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("stop", [3, 4, 5])  # before, at and after the epoch boundary
def test_loader_resume(source, workers, stop):
    with Loader(source, 4, R, seed=9, num_workers=workers) as ld:
        whole = run(ld, 8)
    with Loader(source, 4, R, seed=9, num_workers=workers, prefetch=1) as ld:
        head = run(ld, stop)
        state = json.loads(json.dumps(ld.state()))
    assert_same(head, whole[:stop])
    assert set(state) == {"epoch", "position", "skipped"}
    with Loader(source, 4, R, seed=9, num_workers=3 - workers, state=state) as ld:
        tail = run(ld, 8 - stop)
    assert_same(tail, whole[stop:])


class FlakySource:
    """``source`` whose ``get(index)`` raises OSError the first time."""

    def __init__(self, source, index):
        self.source, self.index, self.num_classes = source, index, source.num_classes

    def __len__(self):
        return len(self.source)

    def get(self, i):
        if i == self.index:
            self.index = None
            raise OSError("disk hiccup")
        return self.source.get(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_error_keeps_state(source, workers):
    with Loader(source, 4, R, seed=4, num_workers=workers) as ld:
        whole = run(ld, 3)
    flaky = FlakySource(source, int(whole[1]["indices"][2]))
    with Loader(flaky, 4, R, seed=4, num_workers=workers) as ld:
        assert_same(run(ld, 1), whole[:1])
        state = ld.state()
        with pytest.raises(OSError, match="disk hiccup"):
            ld.next()
        assert ld.state() == state
        assert_same(run(ld, 2), whole[1:])


def test_loader_bad_state(source):
    with pytest.raises(UserError, match="past the end"):
        Loader(source, 4, R, state={"epoch": 0, "position": 99, "skipped": 0})
    with pytest.raises(UserError, match="epoch, position and skipped"):
        Loader(source, 4, R, state={"epoch": 0})


def test_loader_skips_corrupt(bad_folder, caplog):
    src = ImageFolderSource(bad_folder)
    assert len(src) == 14
    bad = {i for i in range(14) if os.path.basename(src.paths[i]) in
           ("garbage.jpg", "truncated.png")}
    assert len(bad) == 2
    with caplog.at_level(logging.WARNING, logger="pixelflow_jax.data"):
        with Loader(src, 4, R, seed=0, num_workers=2) as ld:
            whole = run(ld, 9)  # 3 batches per epoch: both bad images are met every epoch
            assert ld.skipped == 6
    assert "garbage.jpg" in caplog.text and "truncated.png" in caplog.text
    for b in whole:
        assert b["images"].shape == (4, R, R, 3)
        assert not bad & set(b["indices"].tolist())
    for e in range(3):
        idx = np.concatenate([b["indices"] for b in whole[3 * e:3 * e + 3]])
        assert len(set(idx.tolist())) == 12
        assert [i for i in np.random.default_rng([0, e]).permutation(14) if i not in bad] == \
            list(idx)
    for stop in (1, 2, 4):
        with Loader(src, 4, R, seed=0, num_workers=2) as ld:
            run(ld, stop)
            state, skipped = ld.state(), ld.skipped
        assert state["skipped"] == skipped
        with Loader(src, 4, R, seed=0, num_workers=1, state=state) as ld:
            assert ld.skipped == skipped
            assert_same(run(ld, 9 - stop), whole[stop:])
            assert ld.skipped == 6


def test_loader_too_small(source, bad_folder):
    with pytest.raises(UserError, match="too small"):
        Loader(source, 19, R)
    with pytest.raises(UserError, match="too small"):
        Loader(source, 10, R, process_count=2)  # 9 images per host
    # 14 files but only 12 decode: a batch of 13 can never be filled
    with Loader(ImageFolderSource(bad_folder), 13, R, num_workers=2) as ld:
        with pytest.raises(UserError, match="fewer than 13 readable"):
            ld.next()


def test_loader_center_crop_and_close(source):
    ld = Loader(source, 4, R, center_crop=True, num_workers=2, seed=1)
    b = ld.next()
    i = int(b["indices"][0])
    want = augment(source.get(i)[0], R, 1.125, True, np.random.default_rng([1, 0, i, 1]))
    np.testing.assert_array_equal(b["images"][0], want)
    ld.close()
    ld.close()
    with pytest.raises(RuntimeError):
        ld.next()


def test_hflip_off_never_flips(source):
    # Digits and text must not be mirrored: data.hflip=false turns the flip off and
    # leaves the crop randomness as it was (the flip is drawn last).
    img = noise_image(30, 40, 5)
    base = center_crop(img, R, None, hflip=False)
    flipped = 0
    for s in range(20):
        np.testing.assert_array_equal(center_crop(img, R, np.random.default_rng(s),
                                                  hflip=False), base)
        out = center_crop(img, R, np.random.default_rng(s))
        flipped += not np.array_equal(out, base)
        np.testing.assert_array_equal(out, base if np.array_equal(out, base) else base[:, ::-1])
        a = random_resized_crop(img, R, 1.4, np.random.default_rng(s), hflip=False)
        b = random_resized_crop(img, R, 1.4, np.random.default_rng(s))
        assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
    assert 0 < flipped < 20
    with Loader(source, 4, R, center_crop=True, num_workers=0, seed=1, hflip=False) as ld:
        for batch in run(ld, 3):
            for img_, i in zip(batch["images"], batch["indices"]):
                want = center_crop(decode_rgb(source.get(int(i))[0]), R, None, hflip=False)
                np.testing.assert_array_equal(img_, want)


def test_loader_argument_errors(source):
    with pytest.raises(UserError, match="expand_ratio"):
        Loader(source, 4, R, expand_ratio=0.9)
    with pytest.raises(UserError, match="process index"):
        Loader(source, 4, R, process_index=2, process_count=2)
    with pytest.raises(UserError, match="batch size"):
        Loader(source, 0, R)
