"""The official Dopri5 cascade (DESIGN §4) in PyTorch with torchdiffeq, as a test oracle.

Written from the spec: per stage, t runs from 0 to 1 with T = T_first + t (T_last - T_first);
the state has 2B rows (the batch duplicated at stage 0); the velocity of the first B rows,
guided with the stage scale, moves both halves; at every stage transition each of the 2B rows
gets its own block noise; the error norm is torchdiffeq's RMS over all 2B rows. The first B
rows are the result. ``per_image=True`` is this package's per-image error control instead:
B rows, each image solved on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchdiffeq

import torch_reference as ref


def dopri5_cascade(sd, params, init, blocks_2b, *, guidance, class_labels, rtol=1e-3,
                   atol=1e-6, num_stages=4):
    """The official sampler of a model. init [B, C, h, w]; blocks_2b: per stage s >= 1,
    [2B, C, H_s, W_s] (NCHW, float).

    Returns (x [B, ...], evaluations per stage).
    """
    x, times = dopri5_cascade_of(guided_velocity(sd, params), init, blocks_2b, guidance=guidance,
                                 labels=class_labels, rtol=rtol, atol=atol,
                                 num_stages=num_stages)
    return x, [len(t) for t in times]


def guided_velocity(sd, params):
    """The official class-guided velocity ``v(x, T, g_s, labels) = u + g_s (c - u)``."""
    num_classes = int(params["num_classes"])

    def velocity(x, T, g_s, labels):
        B = x.shape[0]
        out = ref.forward(sd, params, torch.cat([x, x]), T * torch.ones(2 * B, dtype=x.dtype),
                          class_labels=torch.cat([torch.full_like(labels, num_classes),
                                                  labels]))
        u, c = out[:B], out[B:]  # unconditional rows first, as the official pipeline
        return u + g_s * (c - u)
    return velocity


def text_guided_velocity(sd, params, context, context_mask, null_context, null_context_mask):
    """The official text-guided velocity ``u + g (c - u)`` (DESIGN §7), for
    :func:`dopri5_cascade_of` with ``labels`` = row numbers into ``context``.

    The official text pipeline conditions its Euler steps so: the negative prompt's
    features and mask (one row, repeated) first, the prompts' after, the mask as the
    bias (1 - m) * -10000, the same g at every stage (``guidance_weights`` all 1), and no
    unconditional pass where g == 1. (It refuses Dopri5 for text; this extends the class
    oracle with that conditioning.)
    """
    def velocity(x, T, g_s, rows):
        B = x.shape[0]
        ctx, mask = context[rows], context_mask[rows]
        Ts = T * torch.ones(B, dtype=x.dtype)
        if g_s == 1.0:
            return ref.forward(sd, params, x, Ts, context=ctx, context_mask=mask)
        null = null_context.expand(B, *null_context.shape[1:])
        null_mask = null_context_mask.expand(B, *null_context_mask.shape[1:])
        out = ref.forward(sd, params, torch.cat([x, x]), torch.cat([Ts, Ts]),
                          context=torch.cat([null, ctx]),
                          context_mask=torch.cat([null_mask, mask]))
        u, c = out[:B], out[B:]
        return u + g_s * (c - u)
    return velocity


def dopri5_cascade_of(velocity, init, blocks, *, guidance, labels, rtol=1e-3, atol=1e-6,
                      num_stages=4, per_image=False, guidance_weights=None):
    """The cascade of ``velocity(x, T, g_s, labels) -> v`` (x the B result rows).

    ``blocks``: per stage s >= 1 the block noise of every row: 2B rows (the official
    duplicated state), or B with ``per_image``. ``guidance_weights``: per-stage w in
    g_s = (g - 1) w + 1, default the class table (text models: all 1). Returns
    (x [B, ...], times) where ``times[s]`` lists the model timestep T of every velocity
    evaluation of stage s, in order.
    """
    B = init.shape[0]
    x = init if per_image else torch.cat([init, init])
    times = []
    for s, stage in enumerate(ref.stage_schedule(num_stages)):
        if s > 0:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = stage["alpha"] * x + stage["beta"] * blocks[s - 1]
        weight = stage["weight"] if guidance_weights is None else guidance_weights[s]
        g_s = (guidance - 1.0) * weight + 1.0
        times.append([])

        def solve(y0, rows, stage=stage, g_s=g_s, log=times[-1]):
            def f(t, y):
                T = stage["T_first"] + t * (stage["T_last"] - stage["T_first"])
                log.append(float(T))
                v = velocity(y[:len(rows)], T, g_s, labels[rows])
                return torch.cat([v] * (len(y) // len(rows)))  # the duplicate moves with x

            return torchdiffeq.odeint(f, y0, torch.tensor([0.0, 1.0], dtype=y0.dtype),
                                      method="dopri5", rtol=rtol, atol=atol)[-1]

        if per_image:
            x = torch.cat([solve(x[i:i + 1], torch.arange(i, i + 1)) for i in range(B)])
        else:
            x = solve(x, torch.arange(B))
    return x[:B], times
