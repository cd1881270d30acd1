"""Layer-wise fitting of the pooled attention to the original (`gqa --method fitted`).

Pooling, even after alignment, changes what every attention layer outputs, and the errors compound
up the stack. `fitted` starts from the aligned pooling and then, layer by layer from the bottom,
trains the new attention module (all of its parameters) so that its output on the *pooled* model's
hidden states matches the *original* module's output on the original model's hidden states, on a
calibration sample of the train split. Each layer's fit therefore also absorbs the drift of the
layers below it. A step costs a forward and backward of one attention module, not of the model,
so the fit reaches further per second than a fine-tune; the heal that usually follows then starts
much closer to the original.

Only the attention modules are touched; the original modules are the teachers and are dropped
afterwards. Any decoder layer works: masks, position embeddings and per-layer window types are
captured from a real forward of the model and replayed."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import Field

from surgery.data import TextSource, token_blocks
from surgery.lazy import torch

log = logging.getLogger(__name__)

# The parameters of every patch that fits (`gqa`/`mqa` and `mla`), declared once.
CalibrationText = Annotated[
    TextSource, Field(description="calibration source (train split): pydoc, docs, a file, or hf:NAME")
]
FitTokens = Annotated[int, Field(ge=16, le=1 << 22, description="fitted: calibration tokens the layers are fitted on")]
FitSteps = Annotated[int, Field(ge=0, le=100_000, description="fitted: Adam steps per layer (4 sequences each)")]
FitLr = Annotated[float, Field(gt=0, le=1, description="fitted: peak learning rate (cosine to a tenth)")]
FitSeqLen = Annotated[
    int,
    Field(
        ge=16,
        le=1 << 20,
        description="fitted: tokens per calibration window (capped by the model's context); the fit only sees "
        "query-key distances below it",
    ),
]

BATCH = 4  # sequences per fitting step
SEQ_LEN = 512  # tokens per calibration window, unless a patch's fit_seq_len says otherwise


class _Stop(Exception):
    """Raised by a hook to end a forward once the first layer's input is captured."""


def first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def as_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, tuple):
        return tuple(as_float(v) for v in value)
    return value


def calibration_ids(
    model: torch.nn.Module, tokenizer: Any, text: str, tokens: int, seq_len: int = SEQ_LEN
) -> torch.Tensor:
    """(N, seq_len) token blocks spread evenly over the train split; N a multiple of the batch."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or seq_len
    seq_len = min(seq_len, tokens, limit)
    blocks = token_blocks(tokenizer, text, seq_len)
    n = min(len(blocks), max(1, tokens // seq_len))
    n = n - n % BATCH if n >= BATCH else n
    pick = torch.linspace(0, len(blocks) - 1, n).round().long()
    return blocks[pick].to(next(model.parameters()).device)


def layer_inputs(
    model: torch.nn.Module, layers: list[torch.nn.Module], ids: torch.Tensor, batch: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering the first decoder layer, per batch, and the keyword arguments every
    layer receives (masks, position embeddings, ...) for one batch, captured from real forwards."""
    kwargs: list[dict[str, Any] | None] = [None] * len(layers)
    hidden: list[torch.Tensor] = []

    def grab(i: int):
        def hook(_module, args, kw):
            if kwargs[i] is None:
                skip = ("hidden_states", "past_key_values", "past_key_value")
                kwargs[i] = {k: v for k, v in kw.items() if k not in skip}
            if i == 0:
                hidden.append(kw["hidden_states"] if "hidden_states" in kw else args[0])
                if kwargs[-1] is not None:
                    raise _Stop

        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch):
                try:
                    model(ids[start : start + batch], use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs  # type: ignore[return-value]


def through_layer(
    layer: torch.nn.Module, attr: str, attention: torch.nn.Module, hidden: list[torch.Tensor], kwargs: dict[str, Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any], list[torch.Tensor]]:
    """Run `layer` with `attention` in its `attr` slot over the batches: the attention's inputs,
    outputs and keyword arguments, and the layer's outputs."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    attention_kwargs: dict[str, Any] = {}

    def pre(_module, args, kw):
        inputs.append(kw["hidden_states"] if "hidden_states" in kw else args[0])
        if not attention_kwargs:
            attention_kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    def post(_module, _args, _kw, out):
        outputs.append(first(out))

    original = getattr(layer, attr)
    setattr(layer, attr, attention)
    handles = [
        attention.register_forward_pre_hook(pre, with_kwargs=True),
        attention.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            after = [first(layer(h, **kwargs)) for h in hidden]
    finally:
        for h in handles:
            h.remove()
        setattr(layer, attr, original)
    return inputs, outputs, attention_kwargs, after


def fit_module(
    attention: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    batch: int,
    steps: int,
    lr: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """Adam on every parameter of `attention` (in float32) to match `targets`, `batch` sequences a
    step (the batch `kwargs` were captured with); returns the relative squared error before and
    after. Keeps the starting weights if the fit made things worse."""
    dtype = next(attention.parameters()).dtype
    attention.float()
    kwargs = {k: as_float(v) for k, v in kwargs.items()}
    inputs, targets = inputs.float(), targets.float()
    scale = targets.pow(2).mean()

    def error() -> float:
        with torch.no_grad():
            total = sum(
                (first(attention(hidden_states=inputs[i : i + batch], **kwargs)) - targets[i : i + batch]).pow(2).sum()
                for i in range(0, len(inputs), batch)
            )
        return (total / targets.numel() / scale).item()

    before = error()
    start = {k: v.detach().clone() for k, v in attention.state_dict().items()}
    params = list(attention.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 10)
    with torch.enable_grad():
        for _ in range(steps):
            pick = torch.randperm(len(inputs), generator=generator)[:batch].to(inputs.device)
            out = first(attention(hidden_states=inputs[pick], **kwargs))
            loss = (out - targets[pick]).pow(2).mean() / scale
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    after = error()
    if not after < before:
        attention.load_state_dict(start)
        after = before
    for p, flag in zip(params, flags, strict=True):
        p.requires_grad_(flag)
    attention.to(dtype)
    return before, after


def fit_attention(
    model: torch.nn.Module,
    modules: list[tuple[str, torch.nn.Module]],
    teachers: dict[str, torch.nn.Module],
    patch: Any,
    tokenizer: Any,
    teacher_model: torch.nn.Module | None = None,
) -> list[str]:
    """Fit every new attention module in `modules` (bottom-up) to its teacher; returns notes. The
    teachers run in `model`'s layers, or in `teacher_model`'s (same module names) where the new
    model is another architecture, with the position embeddings and masks that model makes."""
    from surgery.io import progress

    ids = calibration_ids(model, tokenizer, patch.calibration_text, patch.fit_tokens, patch.fit_seq_len)
    batch = min(BATCH, len(ids))
    parents = [name.rsplit(".", 1)[0] for name, _ in modules]
    layers = [model.get_submodule(parent) for parent in parents]
    hidden, layer_kwargs = layer_inputs(model, layers, ids, batch)
    teacher_layers, teacher_kwargs = layers, layer_kwargs
    if teacher_model is not None:
        teacher_layers = [teacher_model.get_submodule(parent) for parent in parents]
        hidden, teacher_kwargs = layer_inputs(teacher_model, teacher_layers, ids, batch)
    student_hidden = [h.clone() for h in hidden]
    generator = torch.Generator().manual_seed(0)
    errors = []
    bar = progress(len(modules), "fitting attention", "layer")
    for (name, student), layer, kwargs, teacher_layer, taught in zip(
        modules, layers, layer_kwargs, teacher_layers, teacher_kwargs, strict=True
    ):
        attr = name.rsplit(".", 1)[1]
        _, targets, _, hidden = through_layer(teacher_layer, attr, teachers[name], hidden, taught)
        inputs, _, attention_kwargs, _ = through_layer(layer, attr, student, student_hidden, kwargs)
        errors.append(
            fit_module(
                student,
                torch.cat(inputs),
                torch.cat(targets),
                attention_kwargs,
                batch,
                patch.fit_steps,
                patch.fit_lr,
                generator,
            )
        )
        *_, student_hidden = through_layer(layer, attr, student, student_hidden, kwargs)
        log.info("%s: relative error %.4f -> %.4f", name, *errors[-1])
        bar.set_postfix(error=f"{errors[-1][1]:.3f}", refresh=False)  # before the update: a logged line carries it
        bar.update(1)
    bar.close()
    before = sum(e[0] for e in errors) / len(errors)
    after = sum(e[1] for e in errors) / len(errors)
    return [
        f"fitted {len(errors)} attention layers on {ids.numel()} calibration tokens, {patch.fit_steps} steps each: "
        f"mean relative output error {before:.3f} -> {after:.3f}"
    ]
