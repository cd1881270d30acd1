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

import dataclasses
import logging
from typing import Any

from surgery.arch import head_dim, kv_heads, text_config
from surgery.data import load_text, token_stream
from surgery.lazy import torch

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


@dataclasses.dataclass
class Heads:
    """One attention module's projections split per head, in float32: q (n_q, dim, in),
    k and v (n_kv, dim, in), o (hidden, n_q, dim), biases (heads, dim) or None."""

    state: dict[str, torch.Tensor]  # the module's state dict, for the keys this does not touch
    q_w: torch.Tensor
    k_w: torch.Tensor
    v_w: torch.Tensor
    o_w: torch.Tensor
    q_b: torch.Tensor | None
    k_b: torch.Tensor | None
    v_b: torch.Tensor | None


def split_heads(module: torch.nn.Module, n_q: int, n_kv: int, dim: int) -> Heads:
    state = {k: t.detach().clone() for k, t in module.state_dict().items()}
    if "qkv_proj.weight" in state:  # fused q|k|v (Phi3)
        q_w, k_w, v_w = state["qkv_proj.weight"].float().split([n_q * dim, n_kv * dim, n_kv * dim])
    else:
        q_w, k_w, v_w = (state[f"{p}_proj.weight"].float() for p in "qkv")
    o_w = state["o_proj.weight"].float()

    def bias(key: str, heads: int) -> torch.Tensor | None:
        return state[key].float().view(heads, dim).clone() if key in state else None

    return Heads(
        state=state,
        q_w=q_w.reshape(n_q, dim, -1).clone(),
        k_w=k_w.reshape(n_kv, dim, -1).clone(),
        v_w=v_w.reshape(n_kv, dim, -1).clone(),
        o_w=o_w.reshape(o_w.shape[0], n_q, dim).clone(),
        q_b=bias("q_proj.bias", n_q),
        k_b=bias("k_proj.bias", n_kv),
        v_b=bias("v_proj.bias", n_kv),
    )


def rotate_onto_group(heads: Heads, x: torch.Tensor, group: int, per_kv: int, rot: int, keys_too: bool) -> None:
    """Rotate every kv head onto its group's first head, in place, without changing the module's
    function: values by a Procrustes map absorbed into o_proj, keys (unless per-head norms forbid
    it) by one rotation per RoPE plane absorbed into the queries that read them. `x` (tokens, hidden)."""
    h_ = heads
    for h in range(h_.k_w.shape[0]):
        ref = h - h % group
        if h == ref:
            continue
        readers = range(h * per_kv, (h + 1) * per_kv)  # query heads that read kv head h
        v_h = x @ h_.v_w[h].T + (h_.v_b[h] if h_.v_b is not None else 0)
        v_ref = x @ h_.v_w[ref].T + (h_.v_b[ref] if h_.v_b is not None else 0)
        r = procrustes(v_h, v_ref)  # (dim, dim)
        h_.v_w[h] = r.T @ h_.v_w[h]
        if h_.v_b is not None:
            h_.v_b[h] = r.T @ h_.v_b[h]
        for i in readers:
            h_.o_w[:, i] = h_.o_w[:, i] @ r
        if not keys_too:
            continue
        k_h = x @ h_.k_w[h].T + (h_.k_b[h] if h_.k_b is not None else 0)
        k_ref = x @ h_.k_w[ref].T + (h_.k_b[ref] if h_.k_b is not None else 0)
        angles = plane_rotations(k_h, k_ref, rot)
        h_.k_w[h] = rotate_planes(h_.k_w[h], angles, rot)
        if h_.k_b is not None:
            h_.k_b[h] = rotate_planes(h_.k_b[h], angles, rot)
        for i in readers:
            h_.q_w[i] = rotate_planes(h_.q_w[i], angles, rot)
            if h_.q_b is not None:
                h_.q_b[i] = rotate_planes(h_.q_b[i], angles, rot)


def pool_groups(heads: Heads, group: int, per_kv: int) -> None:
    """Pool each group of aligned kv heads into one, in place: keys averaged, values by
    `output_weighted_pool`."""
    n_kv, dim = heads.k_w.shape[:2]
    heads.k_w = heads.k_w.view(n_kv // group, group, dim, -1).mean(1)
    heads.k_b = heads.k_b.view(n_kv // group, group, dim).mean(1) if heads.k_b is not None else None
    heads.v_w, heads.v_b = output_weighted_pool(heads.v_w, heads.v_b, heads.o_w, group, per_kv)


def merge_heads(heads: Heads) -> dict[str, torch.Tensor]:
    """The module's state dict with the (rotated, maybe pooled) heads written back in its dtype."""
    state = dict(heads.state)
    dtype = state["o_proj.weight"].dtype

    def flat(t: torch.Tensor) -> torch.Tensor:  # (heads, dim, in) -> rows
        return t.reshape(-1, *t.shape[2:]).to(dtype)

    if "qkv_proj.weight" in state:
        state["qkv_proj.weight"] = torch.cat([flat(heads.q_w), flat(heads.k_w), flat(heads.v_w)])
    else:
        state["q_proj.weight"], state["k_proj.weight"], state["v_proj.weight"] = map(
            flat, (heads.q_w, heads.k_w, heads.v_w)
        )
    for key, bias in (("q_proj.bias", heads.q_b), ("k_proj.bias", heads.k_b), ("v_proj.bias", heads.v_b)):
        if bias is not None:
            state[key] = bias.reshape(-1).to(dtype)
    state["o_proj.weight"] = heads.o_w.reshape(heads.o_w.shape[0], -1).to(dtype)
    return state


def rotated_heads(
    model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], patch: Any, tokenizer: Any
) -> dict[str, Heads]:
    """Every attention module's heads rotated onto their group's first head (function unchanged)."""
    config = text_config(model.config)
    n_q, n_kv, dim = config.num_attention_heads, kv_heads(config), head_dim(config)
    rope = config.rope_parameters if "rope_type" in (config.rope_parameters or {}) else {}
    rot = int(dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    group = n_kv // patch.num_kv_heads
    inputs = calibration_inputs(model, modules, tokenizer, patch.calibration_text, patch.calibration_tokens)
    out = {}
    for name, module in modules:
        heads = split_heads(module, n_q, n_kv, dim)
        rotate_onto_group(heads, inputs[name], group, n_q // n_kv, rot, keys_too=not hasattr(module, "k_norm"))
        out[name] = heads
    return out


def align_heads(
    model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], patch: Any, tokenizer: Any
) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of every attention module with heads rotated onto their group's first head, then
    pooled: keys averaged, values by `output_weighted_pool`."""
    config = text_config(model.config)
    n_q, n_kv = config.num_attention_heads, kv_heads(config)
    states = {}
    for name, heads in rotated_heads(model, modules, patch, tokenizer).items():
        pool_groups(heads, n_kv // patch.num_kv_heads, n_q // n_kv)
        states[name] = merge_heads(heads)
    return states
