"""Data-aware head alignment before pooling (`gqa --method aligned`).

Heads in a group learn their own bases, so averaging them blurs features that merely sit in
different coordinates. Before averaging we rotate each head onto the group's first head, using
the attention inputs of a calibration sample (train split of the text source):

- values: an orthogonal Procrustes map R (V_h R ~ V_ref); exact to absorb, because the output
  projection columns of every query head reading that value head are multiplied by R too;
- keys: one 2-D rotation per RoPE frequency plane (dims j and j + rot/2), which commutes with RoPE;
  the same rotation on the query heads reading the key head keeps every q.k exactly. Skipped on
  models with per-head q/k norms (Qwen3, Gemma3), whose per-dimension weights do not commute.

The model computes exactly what it did before the rotations; only the merge changes. Keys are then
averaged; values are pooled by least squares on the output projection (`output_weighted_pool`).
On SmolLM2 3 -> 1 the rotations cut held-out perplexity ~40x against plain averaging, and the
value least squares another ~35%."""

from __future__ import annotations

import logging
from typing import Any

import torch

from surgery.evaluate.text import load_text, token_stream
from surgery.models import head_dim, kv_heads, text_config

log = logging.getLogger(__name__)


def calibration_inputs(
    model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], tokenizer: Any, text: str, tokens: int
) -> dict[str, torch.Tensor]:
    """Attention-module inputs (tokens, hidden) of every layer for one calibration window."""
    stream = token_stream(tokenizer, load_text(text, "train"))[:tokens]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.cat([torch.tensor(bos, dtype=torch.long), stream])[None].to(next(model.parameters()).device)
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def grab(module, args, kwargs):
            captured[name] = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0])[0].float()

        return grab

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules]
    try:
        with torch.inference_mode():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    log.info("aligned pooling: %d calibration tokens", ids.shape[1])
    return captured


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Orthogonal R minimising ||source @ R - target||_F (both (tokens, dim))."""
    u, _, vt = torch.linalg.svd(source.T @ target)
    return u @ vt


def plane_rotations(source: torch.Tensor, target: torch.Tensor, rot: int) -> torch.Tensor:
    """(rot/2,) angles rotating each RoPE plane (j, j+rot/2) of `source` onto `target`."""
    half = rot // 2
    xs, ys, xt, yt = source[:, :half], source[:, half:rot], target[:, :half], target[:, half:rot]
    return torch.atan2((xs * yt - ys * xt).sum(0), (xs * xt + ys * yt).sum(0))


def rotate_planes(rows: torch.Tensor, angles: torch.Tensor, rot: int) -> torch.Tensor:
    """Apply per-plane rotations to head rows (dim, ...) laid out as RoPE's rotate_half pairs."""
    half = rot // 2
    x, y = rows[:half], rows[half:rot]
    c, s = angles.cos().view(-1, *[1] * (rows.dim() - 1)), angles.sin().view(-1, *[1] * (rows.dim() - 1))
    return torch.cat([x * c - y * s, x * s + y * c, rows[rot:]])


def output_weighted_pool(v_w: torch.Tensor, v_b: torch.Tensor | None, o_w: torch.Tensor, group: int, per_kv: int):
    """Pool value heads by least squares on what o_proj makes of them: the merged head W minimises
    sum_h ||(W - W_h)^T N_h^(1/2)||^2 with N_h = sum of W_o,i^T W_o,i over the query heads i reading
    head h, i.e. W = (sum N_h)^-1 sum N_h W_h. Data-free; equals the mean when all N_h are equal.
    v_w (kv, dim, hidden), v_b (kv, dim) or None, o_w (hidden, n_q, dim)."""
    n_kv, dim = v_w.shape[0], v_w.shape[1]
    weights, biases = [], []
    for j in range(n_kv // group):
        heads = range(j * group, (j + 1) * group)
        grams = [sum(o_w[:, i].T @ o_w[:, i] for i in range(h * per_kv, (h + 1) * per_kv)) for h in heads]
        total = sum(grams)
        total = total + 1e-6 * total.diagonal().mean() * torch.eye(dim)  # guard against a singular sum
        weights.append(torch.linalg.solve(total, sum(g @ v_w[h] for g, h in zip(grams, heads, strict=True))))
        if v_b is not None:
            biases.append(torch.linalg.solve(total, sum(g @ v_b[h] for g, h in zip(grams, heads, strict=True))))
    return torch.stack(weights), (torch.stack(biases) if v_b is not None else None)


def align_heads(
    model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], patch: Any, tokenizer: Any, pool: bool = True
) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of every attention module with heads rotated onto their group's first head and,
    with `pool`, already pooled: keys averaged, values by `output_weighted_pool`."""
    config = text_config(model.config)
    n_q, n_kv, dim = config.num_attention_heads, kv_heads(config), head_dim(config)
    rope = config.rope_parameters if "rope_type" in (config.rope_parameters or {}) else {}
    rot = int(dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    group, per_kv = n_kv // patch.num_kv_heads, n_q // n_kv
    inputs = calibration_inputs(model, modules, tokenizer, patch.calibration_text, patch.calibration_tokens)
    states = {}
    for name, module in modules:
        state = {k: t.detach().clone() for k, t in module.state_dict().items()}
        fused = "qkv_proj.weight" in state
        if fused:
            q_w, k_w, v_w = state["qkv_proj.weight"].float().split([n_q * dim, n_kv * dim, n_kv * dim])
        else:
            q_w, k_w, v_w = (state[f"{p}_proj.weight"].float() for p in "qkv")
        q_b = state.get("q_proj.bias")
        k_b, v_b = state.get("k_proj.bias"), state.get("v_proj.bias")
        o_w = state["o_proj.weight"].float()  # (hidden, n_q*dim)
        x = inputs[name]  # (tokens, hidden)
        q_w, k_w, v_w = q_w.view(n_q, dim, -1).clone(), k_w.view(n_kv, dim, -1).clone(), v_w.view(n_kv, dim, -1).clone()
        q_b = q_b.float().view(n_q, dim).clone() if q_b is not None else None
        k_b = k_b.float().view(n_kv, dim).clone() if k_b is not None else None
        v_b = v_b.float().view(n_kv, dim).clone() if v_b is not None else None
        o_w = o_w.view(o_w.shape[0], n_q, dim).clone()
        keys_too = not hasattr(module, "k_norm")
        for h in range(n_kv):
            ref = h - h % group
            if h == ref:
                continue
            readers = range(h * per_kv, (h + 1) * per_kv)  # query heads that read kv head h
            v_h = x @ v_w[h].T + (v_b[h] if v_b is not None else 0)
            v_ref = x @ v_w[ref].T + (v_b[ref] if v_b is not None else 0)
            r = procrustes(v_h, v_ref)  # (dim, dim)
            v_w[h] = r.T @ v_w[h]
            if v_b is not None:
                v_b[h] = r.T @ v_b[h]
            for i in readers:
                o_w[:, i] = o_w[:, i] @ r
            if keys_too:
                k_h = x @ k_w[h].T + (k_b[h] if k_b is not None else 0)
                k_ref = x @ k_w[ref].T + (k_b[ref] if k_b is not None else 0)
                angles = plane_rotations(k_h, k_ref, rot)
                k_w[h] = rotate_planes(k_w[h], angles, rot)
                if k_b is not None:
                    k_b[h] = rotate_planes(k_b[h], angles, rot)
                for i in readers:
                    q_w[i] = rotate_planes(q_w[i], angles, rot)
                    if q_b is not None:
                        q_b[i] = rotate_planes(q_b[i], angles, rot)
        if pool:
            k_w = k_w.view(n_kv // group, group, dim, -1).mean(1)
            k_b = k_b.view(n_kv // group, group, dim).mean(1) if k_b is not None else None
            v_w, v_b = output_weighted_pool(v_w, v_b, o_w, group, per_kv)
        dtype = state["o_proj.weight"].dtype

        def flat(t: torch.Tensor, dtype: torch.dtype = dtype) -> torch.Tensor:  # (heads, dim, in) -> rows
            return t.reshape(-1, *t.shape[2:]).to(dtype)

        if fused:
            state["qkv_proj.weight"] = torch.cat([flat(q_w), flat(k_w), flat(v_w)])
        else:
            state["q_proj.weight"], state["k_proj.weight"], state["v_proj.weight"] = flat(q_w), flat(k_w), flat(v_w)
        for key, bias in (("q_proj.bias", q_b), ("k_proj.bias", k_b), ("v_proj.bias", v_b)):
            if bias is not None:
                state[key] = bias.reshape(-1).to(dtype)
        state["o_proj.weight"] = o_w.reshape(o_w.shape[0], -1).to(dtype)
        states[name] = state
    return states
