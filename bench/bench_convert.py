#!/usr/bin/env python3
"""Benchmark convert_torch.py at XL scale: time and peak memory against the file size.

    python bench/bench_convert.py [--workdir DIR] [--keep]

Writes an XL-shaped class-to-image ``model.pt`` (every tensor of
tests/data/pixelflow_xl_c2i_keys.tsv, normal-scale random float32, 2.7 GB) and
its config into DIR, then times, each in a fresh process (peak RSS is that
process's alone): conversion to a float32 checkpoint, to a bfloat16 one, and
back to model.pt with --to-torch. Deletes the files afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class RandomTensor:
    """A float32 array made on demand (``np.asarray`` calls ``__array__``)."""

    def __init__(self, shape, seed):
        import numpy as np
        self.shape, self.dtype, self.seed = tuple(shape), np.dtype(np.float32), seed
        self.size = int(np.prod(shape))

    def __array__(self, dtype=None, copy=None):
        import numpy as np
        a = np.random.default_rng(self.seed).standard_normal(self.shape, np.float32)
        return a / np.float32(max(1, self.shape[-1]) ** 0.5) if len(self.shape) > 1 else a


def make_xl_checkpoint(folder: str) -> int:
    from pixelflow_jax.config import load_config, save_config
    from pixelflow_jax.convert import official_layout
    from pixelflow_jax.torch_format import write_state_dict

    cfg = load_config(os.path.join(ROOT, "configs", "pixelflow_xl_c2i.yaml"))
    layout = official_layout(cfg.params)
    with open(os.path.join(ROOT, "tests", "data", "pixelflow_xl_c2i_keys.tsv")) as f:
        listed = [line.split("\t")[0] for line in f if not line.startswith("#")]
    assert listed[:-1] == list(layout), "layout differs from the reference key list"
    os.makedirs(folder)
    write_state_dict(os.path.join(folder, "model.pt"),
                     {k: RandomTensor(s, i) for i, (k, s) in enumerate(layout.items())})
    save_config(cfg, os.path.join(folder, "config.yaml"))
    return os.path.getsize(os.path.join(folder, "model.pt"))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, rusage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
    return seconds, rusage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="pixelflow-convert-")
    os.makedirs(work, exist_ok=True)
    try:
        start = time.perf_counter()
        size = make_xl_checkpoint(os.path.join(work, "official"))
        print(f"wrote XL model.pt: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")
        py = [sys.executable, "convert_torch.py"]
        runs = [("official -> float32 checkpoint", py + [f"{work}/official", f"{work}/f32"]),
                ("official -> bfloat16 checkpoint",
                 py + [f"{work}/official", f"{work}/bf16", "--dtype", "bfloat16"]),
                ("checkpoint -> model.pt (--to-torch)",
                 py + ["--to-torch", f"{work}/f32", f"{work}/back"])]
        base_rss = timed([sys.executable, "-c", "import pixelflow_jax.torch_checkpoint"])[1]
        print(f"\nfile size {size / 2**20:.0f} MB; a process that only imports the converter: "
              f"{base_rss:.0f} MB peak RSS\n")
        print("| conversion | wall s | peak RSS MB | peak / file size |")
        print("|---|---|---|---|")
        for name, cmd in runs:
            seconds, rss = timed(cmd)
            print(f"| {name} | {seconds:.1f} | {rss:.0f} | {rss / (size / 2**20):.2f} |")
        a = os.path.join(work, "official", "model.pt")
        b = os.path.join(work, "back", "model.pt")
        same = subprocess.run(["cmp", "-s", a, b]).returncode == 0
        print(f"\nround trip: model.pt byte-identical to the original (both written by "
              f"write_state_dict): {same}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
