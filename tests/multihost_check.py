"""One process of a multi-host run on this machine (run by tests/test_multihost.py).

    python multihost_check.py PROCESS_ID NUM_PROCESSES PORT CKPT OUT

Each process has 2 CPU devices; process 0 coordinates on 127.0.0.1:PORT. With
NUM_PROCESSES 1 it runs alone with 4 devices (the reference).
"""

import os
import sys

process_id, num_processes, port, ckpt, out = sys.argv[1:6]
devices = 4 // int(num_processes)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

if int(num_processes) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=int(num_processes), process_id=int(process_id))

from pixelflow_jax.checkpoint import load_checkpoint  # noqa: E402
from pixelflow_jax.fid import run_fid  # noqa: E402
from pixelflow_jax.sampling import Sampler  # noqa: E402
from pixelflow_jax.scheduler import CascadeSchedule  # noqa: E402

model, cfg = load_checkpoint(ckpt)
sampler = Sampler(model, CascadeSchedule(), cfg.data.resolution)
summary = run_fid(sampler, out, 12, seed=1, guidance=3.0, steps=2, shift=1.0, batch_size=4,
                  settings={}, progress="none")
print(f"process {jax.process_index()} of {jax.process_count()}: drew {summary['drawn']}, "
      f"devices {jax.device_count()}, npz {summary['npz']}")
