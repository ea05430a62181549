"""The official Dopri5 cascade (SPEC §4) in PyTorch with torchdiffeq, as a test oracle.

Written from the spec: per stage, t runs from 0 to 1 with T = T_first + t (T_last - T_first);
the state has 2B rows (the batch duplicated at stage 0); the velocity of the first B rows,
guided with the stage scale, moves both halves; at every stage transition each of the 2B rows
gets its own block noise; the error norm is torchdiffeq's RMS over all 2B rows. The first B
rows are the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchdiffeq

import torch_reference as ref


def dopri5_cascade(sd, params, init, blocks_2b, *, guidance, class_labels, rtol=1e-3,
                   atol=1e-6, num_stages=4):
    """init [B, C, h, w]; blocks_2b: per stage s >= 1, [2B, C, H_s, W_s] (NCHW, float).

    Returns (x [B, ...], evaluations per stage).
    """
    B = init.shape[0]
    num_classes = int(params["num_classes"])
    labels = torch.cat([torch.full_like(class_labels, num_classes), class_labels])
    x = torch.cat([init, init])
    evaluations = []
    for s, stage in enumerate(ref.stage_schedule(num_stages)):
        if s > 0:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = stage["alpha"] * x + stage["beta"] * blocks_2b[s - 1]
        g_s = (guidance - 1.0) * stage["weight"] + 1.0
        count = [0]

        def velocity(t, y, stage=stage, g_s=g_s, count=count):
            count[0] += 1
            half = y[:B]
            T = stage["T_first"] + t * (stage["T_last"] - stage["T_first"])
            out = ref.forward(sd, params, torch.cat([half, half]),
                              T * torch.ones(2 * B, dtype=y.dtype), class_labels=labels)
            u, c = out[:B], out[B:]
            v = u + g_s * (c - u)
            return torch.cat([v, v])

        x = torchdiffeq.odeint(velocity, x, torch.tensor([0.0, 1.0], dtype=x.dtype),
                               method="dopri5", rtol=rtol, atol=atol)[-1]
        evaluations.append(count[0])
    return x[:B], evaluations
