"""Independent PyTorch oracle for PixelFlow (network + Euler cascade sampler).

Written only from the specification (docs/DESIGN.md §1-7), to check another implementation numerically.
Small, explicit and slow on purpose: no nn.Module, just functions over a state dict
whose names and shapes are those of the official checkpoints.

Model hyper-parameters are the official ``config.yaml`` ``model.params`` dict:
``num_attention_heads, attention_head_dim, in_channels, out_channels, depth,
patch_size, num_classes`` (0 = no class table), ``attention_bias`` and optional
``cross_attention_dim`` (None / missing = no cross-attention).

Everything runs in the dtype of the state-dict tensors (float64 for the oracle),
except the argument of the sinusoidal projection, which is a float32 product as in the
official model (DESIGN §6).
"""

from __future__ import annotations

import collections
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

NORM_EPS = 1e-6          # LayerNorm and RMSNorm epsilon
MASK_BIAS = -10000.0     # additive bias for masked-out text tokens
SINUSOID_HALF = 128      # the projection is 256 wide: 128 cosines then 128 sines
GUIDANCE_STAGE_WEIGHTS_4 = (0.0, 1.0 / 6.0, 2.0 / 3.0, 1.0)


# ----------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------

def _dims(params: dict):
    heads = int(params["num_attention_heads"])
    head_dim = int(params["attention_head_dim"])
    return heads, head_dim, heads * head_dim


def _cross_dim(params: dict) -> Optional[int]:
    c = params.get("cross_attention_dim", None)
    return None if c is None else int(c)


def state_dict_keys(params: dict) -> "dict[str, tuple[int, ...]]":
    """Every official parameter name -> shape, in the official order."""
    _, _, E = _dims(params)
    C_in = int(params["in_channels"])
    C_out = int(params["out_channels"])
    p = int(params["patch_size"])
    num_classes = int(params.get("num_classes", 0) or 0)
    bias = bool(params.get("attention_bias", True))
    cross = _cross_dim(params)

    keys: "dict[str, tuple[int, ...]]" = {}

    def linear(name, n_in, n_out, with_bias=True):
        keys[f"{name}.weight"] = (n_out, n_in)
        if with_bias:
            keys[f"{name}.bias"] = (n_out,)

    keys["patch_embed.proj.weight"] = (E, C_in, p, p)
    keys["patch_embed.proj.bias"] = (E,)
    for emb in ("timestep_embedder", "latent_size_embedder"):
        linear(f"{emb}.linear_1", 2 * SINUSOID_HALF, E)
        linear(f"{emb}.linear_2", E, E)
    if num_classes > 0:
        keys["class_embedder.embedding_table.weight"] = (num_classes + 1, E)

    def attention(prefix, kv_in):
        linear(f"{prefix}.q_proj", E, E, bias)
        linear(f"{prefix}.k_proj", kv_in, E, bias)
        linear(f"{prefix}.v_proj", kv_in, E, bias)
        linear(f"{prefix}.o_proj", E, E, bias)
        keys[f"{prefix}.q_norm.weight"] = (E,)
        keys[f"{prefix}.k_norm.weight"] = (E,)

    for i in range(int(params["depth"])):
        b = f"transformer_blocks.{i}"
        linear(f"{b}.norm1.linear", E, 6 * E)
        attention(f"{b}.attn1", E)
        if cross is not None:
            keys[f"{b}.norm2.weight"] = (E,)
            attention(f"{b}.attn2", cross)
        keys[f"{b}.norm3.weight"] = (E,)
        linear(f"{b}.mlp.fc1", E, 4 * E)
        linear(f"{b}.mlp.fc2", 4 * E, E)

    linear("proj_out_1", E, 2 * E)
    linear("proj_out_2", E, p * p * C_out)
    return keys


def random_state_dict(params: dict, seed: int = 0, dtype=torch.float64
                      ) -> "collections.OrderedDict[str, torch.Tensor]":
    """Random weights of normal scale (NOT the official zero init).

    linear/conv weights N(0, 1/fan_in); biases N(0, 0.1^2); RMSNorm weights 1 + 0.2 N(0, 1);
    class table N(0, 1). Drawn in float64 from a seeded generator and then cast, so the
    float32 and float64 versions for one seed hold the same numbers up to rounding.
    """
    gen = torch.Generator().manual_seed(int(seed))
    sd = collections.OrderedDict()
    for name, shape in state_dict_keys(params).items():
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name == "class_embedder.embedding_table.weight":
            w = z
        elif name.endswith(".bias"):
            w = 0.1 * z
        elif len(shape) == 1:                       # RMSNorm weights (q_norm, k_norm, norm2, norm3)
            w = 1.0 + 0.2 * z
        else:                                       # linear [out, in] or conv [E, C, p, p]
            fan_in = int(np.prod(shape[1:]))
            w = z / math.sqrt(fan_in)
        sd[name] = w.to(dtype)
    return sd


# ----------------------------------------------------------------------------------------
# Network pieces
# ----------------------------------------------------------------------------------------

def sinusoid(value: torch.Tensor, dtype) -> torch.Tensor:
    """[B] -> [B, 256] = [cos(v f), sin(v f)], argument computed as a float32 product."""
    freqs = torch.exp(-math.log(10000) * torch.arange(SINUSOID_HALF, dtype=torch.float32)
                      / (SINUSOID_HALF - 1))
    arg = value.to(torch.float32)[:, None] * freqs[None, :]
    arg = arg.to(dtype)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _mlp_embed(sd, name, feats):
    return _linear(sd, f"{name}.linear_2", F.silu(_linear(sd, f"{name}.linear_1", feats)))


def layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)


def rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS) * weight


def rope_tables(n: int, head_dim: int, dtype):
    """cos/sin tables [n*n, head_dim] for tokens in row-major (y, x) order.

    First head_dim/2 channels: angle = column index x * w_k; last head_dim/2: row index y * w_k;
    w_k = 10000^(-2k/(head_dim/2)), k = 0..head_dim/4-1, each repeated twice (pairs 2i, 2i+1).
    """
    assert head_dim % 4 == 0, "2-D RoPE needs head_dim divisible by 4"
    half = head_dim // 2
    k = torch.arange(half // 2, dtype=torch.float64)
    w = 10000.0 ** (-2.0 * k / half)
    w = torch.repeat_interleave(w, 2)                         # [half]: w0 w0 w1 w1 ...
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float64),
                            torch.arange(n, dtype=torch.float64), indexing="ij")
    xs, ys = xs.reshape(-1), ys.reshape(-1)                   # token j = y * n + x
    angle = torch.cat([xs[:, None] * w[None, :], ys[:, None] * w[None, :]], dim=-1)
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def apply_rope(x, cos, sin):
    """x [B, heads, N, D]; rotate channel pairs (2i, 2i+1) by the tabled angles."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-x_odd, x_even], dim=-1).reshape(x.shape)   # (-x_{2i+1}, x_{2i})
    return x * cos + rotated * sin


def _split_heads(t, heads):
    B, N, E = t.shape
    return t.reshape(B, N, heads, E // heads).transpose(1, 2)            # [B, H, N, D]


def attention(sd, prefix, h, kv, heads, cos, sin, bias=None, rope_k=True):
    """q from h [B, N, E]; k/v from kv [B, L, *]. q/k RMSNorm over all E channels, then RoPE."""
    q = rms_norm(_linear(sd, f"{prefix}.q_proj", h), sd[f"{prefix}.q_norm.weight"])
    k = rms_norm(_linear(sd, f"{prefix}.k_proj", kv), sd[f"{prefix}.k_norm.weight"])
    v = _linear(sd, f"{prefix}.v_proj", kv)
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    q = apply_rope(q, cos, sin)
    if rope_k:
        k = apply_rope(k, cos, sin)
    # softmax(q k^T / sqrt(D) + bias) v, through PyTorch's fused kernel as the official
    # model does (float64 takes its exact math path): the benchmarks' eager baseline.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)      # [B, H, N, D]
    B, H, N, D = out.shape
    out = out.transpose(1, 2).reshape(B, N, H * D)
    return _linear(sd, f"{prefix}.o_proj", out)


def forward(sd, params, x, T, class_labels=None, context=None, context_mask=None) -> torch.Tensor:
    """The PixelFlow network (DESIGN §2). x NCHW [B, C, H, W] -> [B, out_channels, H, W]."""
    dtype = next(iter(sd.values())).dtype
    heads, head_dim, E = _dims(params)
    p = int(params["patch_size"])
    C_out = int(params["out_channels"])
    num_classes = int(params.get("num_classes", 0) or 0)
    cross = _cross_dim(params)

    x = torch.as_tensor(x).to(dtype)
    B, _, H, W = x.shape
    assert H == W and H % p == 0, "square input with side divisible by patch_size"
    n = H // p
    T = torch.as_tensor(T)
    if T.ndim == 0:
        T = T.expand(B)

    # conditioning vector
    cond = _mlp_embed(sd, "timestep_embedder", sinusoid(T, dtype))
    size = torch.full((B,), float(n), dtype=torch.float64)
    cond = cond + _mlp_embed(sd, "latent_size_embedder", sinusoid(size, dtype))
    if num_classes > 0:
        if class_labels is None:
            raise ValueError("class-conditional model needs class_labels (null label = num_classes)")
        cond = cond + sd["class_embedder.embedding_table.weight"][torch.as_tensor(class_labels).long()]
    silu_cond = F.silu(cond)

    # patch embedding, tokens row-major (y, x)
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2)                                   # [B, n*n, E]
    cos, sin = rope_tables(n, head_dim, dtype)

    text_bias = None
    if cross is not None:
        if context is None:
            raise ValueError("text-conditional model needs context")
        context = torch.as_tensor(context).to(dtype)
        if context_mask is not None:
            m = torch.as_tensor(context_mask).to(dtype)
            text_bias = ((1.0 - m) * MASK_BIAS)[:, None, None, :]      # [B, 1, 1, L]

    for i in range(int(params["depth"])):
        b = f"transformer_blocks.{i}"
        mod = _linear(sd, f"{b}.norm1.linear", silu_cond)[:, None, :]  # [B, 1, 6E]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)

        a = layer_norm(h) * (1 + scale_msa) + shift_msa
        h = h + gate_msa * attention(sd, f"{b}.attn1", a, a, heads, cos, sin)

        if cross is not None:
            c_in = rms_norm(h, sd[f"{b}.norm2.weight"])
            h = h + attention(sd, f"{b}.attn2", c_in, context, heads, cos, sin,
                              bias=text_bias, rope_k=False)

        m = rms_norm(h, sd[f"{b}.norm3.weight"]) * (1 + scale_mlp) + shift_mlp
        m = _linear(sd, f"{b}.mlp.fc2",
                    F.gelu(_linear(sd, f"{b}.mlp.fc1", m), approximate="tanh"))
        h = h + gate_mlp * m

    shift, scale = _linear(sd, "proj_out_1", silu_cond)[:, None, :].chunk(2, dim=-1)
    h = layer_norm(h) * (1 + scale) + shift
    h = _linear(sd, "proj_out_2", h)                                   # [B, n*n, p*p*C_out]

    # unpatchify: token (y, x), features (py, px, c) -> pixel (c, y*p+py, x*p+px)
    h = h.reshape(B, n, n, p, p, C_out).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(B, C_out, n * p, n * p)


# ----------------------------------------------------------------------------------------
# Cascade schedule (DESIGN §3), float64
# ----------------------------------------------------------------------------------------

def stage_schedule(num_stages: int = 4, num_train_timesteps: int = 1000,
                   gamma: float = -1 / 3) -> "list[dict]":
    S, K = int(num_stages), int(num_train_timesteps)
    c = math.sqrt(1.0 - 1.0 / gamma)
    stages = []
    for s in range(S):
        ost = s / S
        denom = c * (1.0 - ost) + ost
        start_t = 0.0 if s == 0 else ost / denom
        alpha = 1.0 / denom
        beta = alpha * (1.0 - ost) / math.sqrt(-gamma)
        stages.append(dict(original_start_t=ost, start_t=start_t, end_t=(s + 1) / S,
                           alpha=alpha, beta=beta))

    # T slices proportional to end_t - start_t; integer boundaries on the train grid.
    lengths = np.array([st["end_t"] - st["start_t"] for st in stages], dtype=np.float64)
    cum = np.concatenate([[0.0], np.cumsum(lengths / lengths.sum())])
    bounds = [int(math.floor(v * K)) for v in cum]
    bounds[-1] = K - 1
    for s, st in enumerate(stages):
        a, b = float(bounds[s]), float(bounds[s + 1])
        if s < S - 1:       # K values of linspace(a, b, K + 1)[:-1]: stop one step before b
            T_last = a + (b - a) * (K - 1) / K
        else:               # last stage includes its end
            T_last = b
        st["T_first"], st["T_last"] = a, T_last
        st["weight"] = GUIDANCE_STAGE_WEIGHTS_4[s] if S == 4 else None
    return stages


def inference_timesteps(stage: dict, num_steps: int, shift: float):
    """float64 T [N] and t [N+1] for one stage (Euler)."""
    t = np.linspace(0.0, 0.999, int(num_steps), dtype=np.float64)
    t = t / (shift + (1.0 - shift) * t)
    T = stage["T_first"] + (t / 0.999) * (stage["T_last"] - stage["T_first"])
    t = np.concatenate([t, [1.0]])
    return T, t


# ----------------------------------------------------------------------------------------
# Euler cascade sampler (DESIGN §3-4) with external noise
# ----------------------------------------------------------------------------------------

def to_image(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / 2 + 0.5, 0, 1)


def _rows(t, B):
    t = torch.as_tensor(t)
    return t.expand(B, *t.shape[1:]) if t.shape[0] == 1 and B != 1 else t


def euler_cascade(sd, params, init, block_noise, *, guidance, steps, shift=1.0,
                  class_labels=None, context=None, context_mask=None,
                  null_context=None, null_context_mask=None, num_stages=4) -> torch.Tensor:
    dtype = next(iter(sd.values())).dtype
    num_classes = int(params.get("num_classes", 0) or 0)
    text = _cross_dim(params) is not None
    stages = stage_schedule(num_stages)
    S = len(stages)
    steps_list: Sequence[int] = [int(steps)] * S if isinstance(steps, (int, np.integer)) else list(steps)
    assert len(steps_list) == S
    assert len(block_noise) == S - 1
    g = float(guidance)

    x = torch.as_tensor(init).to(dtype)
    B = x.shape[0]
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels).long()
    if text:
        context = torch.as_tensor(context).to(dtype)
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=dtype)
        if g > 1:
            null_context = _rows(torch.as_tensor(null_context).to(dtype), B)
            if null_context_mask is None:
                null_context_mask = torch.ones(null_context.shape[:2], dtype=dtype)
            null_context_mask = _rows(torch.as_tensor(null_context_mask).to(dtype), B)
            ctx2 = torch.cat([null_context, context], dim=0)            # negative rows first
            mask2 = torch.cat([null_context_mask, torch.as_tensor(context_mask).to(dtype)], dim=0)

    for s, stage in enumerate(stages):
        if s > 0:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = stage["alpha"] * x + stage["beta"] * torch.as_tensor(block_noise[s - 1]).to(dtype)
        T, t = inference_timesteps(stage, steps_list[s], shift)

        for i in range(len(T)):
            if num_classes > 0 and g > 0:
                g_s = (g - 1.0) * stage["weight"] + 1.0
                labels2 = torch.cat([torch.full((B,), num_classes, dtype=torch.long), class_labels])
                out = forward(sd, params, torch.cat([x, x]), torch.full((2 * B,), T[i], dtype=torch.float64),
                              class_labels=labels2)
                u, c = out.chunk(2)
                v = u + g_s * (c - u)
            elif text and g > 1:
                out = forward(sd, params, torch.cat([x, x]), torch.full((2 * B,), T[i], dtype=torch.float64),
                              context=ctx2, context_mask=mask2)
                u, c = out.chunk(2)
                v = u + g * (c - u)
            else:
                v = forward(sd, params, x, torch.full((B,), T[i], dtype=torch.float64),
                            class_labels=class_labels, context=context, context_mask=context_mask)
            x = x + float(t[i + 1] - t[i]) * v
    return x
