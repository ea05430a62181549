"""Run by tests/test_devices.py under XLA_FLAGS=--xla_force_host_platform_device_count=8.

Draws the same images on a 1-device mesh and on the 8-device mesh and prints a JSON
report: differences per solver, and how the 8-device outputs are sharded.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pixelflow_jax.checkpoint import model_from_tree  # noqa: E402
from pixelflow_jax.config import config_from_dict  # noqa: E402
from pixelflow_jax.convert import official_to_nnx  # noqa: E402
from pixelflow_jax.distributed import data_mesh  # noqa: E402
from pixelflow_jax.random_weights import normal_scale_state_dict  # noqa: E402
from pixelflow_jax.sampling import Sampler, to_images  # noqa: E402
from pixelflow_jax.scheduler import CascadeSchedule  # noqa: E402
from pixelflow_jax.solvers import Dopri5Config  # noqa: E402

PARAMS = dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
              depth=2, patch_size=2, num_classes=10, attention_bias=True)


def main() -> None:
    cfg = config_from_dict({"model": {"target": "pixelflow.model.PixelFlowModel",
                                      "params": PARAMS},
                            "scheduler": {"num_train_timesteps": 1000, "num_stages": 4},
                            "data": {"resolution": 32}})
    model = model_from_tree(official_to_nnx(normal_scale_state_dict(cfg.params, 3), cfg.params),
                            cfg)
    labels, indices = np.arange(8) % 10, np.arange(100, 108)
    report = {"devices": jax.device_count()}
    for name, solver, dopri5 in [("euler", "euler", None),
                                 ("dopri5-image", "dopri5", Dopri5Config(error_control="image")),
                                 ("dopri5-batch", "dopri5", Dopri5Config())]:
        outs = {}
        for n in (1, 8):
            sampler = Sampler(model, CascadeSchedule(), 32, solver=solver, dopri5=dopri5,
                              mesh=data_mesh(jax.devices()[:n]))
            out = sampler.sample(7, indices, labels=labels, guidance=3.0, steps=3)
            outs[n] = out
        x1, x8 = np.asarray(outs[1].x), np.asarray(outs[8].x)
        report[name] = {
            "max_abs_diff": float(np.abs(x1 - x8).max()),
            "bitwise_equal": bool(np.array_equal(x1, x8)),
            "uint8_levels_differing": int(np.abs(np.asarray(to_images(x1), np.int32)
                                                 - np.asarray(to_images(x8), np.int32)).sum()),
            "shards": len(outs[8].x.sharding.device_set),
            "finished": bool(np.all(outs[8].stats.finished)),
            "steps_8": np.asarray(outs[8].stats.steps)[:, :].tolist(),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
