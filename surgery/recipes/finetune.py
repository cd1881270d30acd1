"""Short recovery fine-tunes on accelerate: LoRA through PEFT (merged back, so the result is a plain
checkpoint) or full fine-tuning, optionally restricted to parameters matching glob patterns.

Two objectives: `ce`, next-token cross-entropy on the text, and `kl`, distillation toward a teacher
(in a recipe, the model it started from): KL(teacher ‖ model) per position, read from the teacher's
top-k log-probs with the tail lumped (the divergence eval's statistics and cache, so the teacher is
loaded once, run over the training blocks, and freed before training starts), mixed with
cross-entropy by `kl_weight`. A heal on `ce` learns its training text; a heal on `kl` learns the
teacher's behaviour on it, which carries to text it never saw.

The same code runs in one process or under `accelerate launch` with several: the Accelerator
shards the data, wraps the model for data parallelism and averages gradients; losses are gathered
so every process logs the same curve. Under an FSDP config (fsdp_version 2) the model is sharded
across the processes instead: a copy of it is trained sharded, and its full weights are gathered
back into the plain model tensor by tensor, so the next steps and the saved checkpoint see a plain
transformers model. accelerate turns FSDP on only on accelerators; on CPU (gloo) this module turns
it on itself, so the sharded code path is the one the tests run. Data comes from the train part of
a text source only, so a held-out evaluation never sees what the heal trained on."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from surgery.data import TextSource, token_blocks
from surgery.errors import SurgeryError, numbers_not_bools
from surgery.lazy import torch

log = logging.getLogger(__name__)


class Finetune(BaseModel):
    """Settings of a finetune step."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_not_bools(cls, data: Any) -> Any:
        return numbers_not_bools(cls, data)

    method: Literal["lora", "full"] = Field("lora", description="lora (merged back after training) or full")
    max_steps: int = Field(50, ge=1, description="optimizer steps")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="peak learning rate")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps, then cosine decay to 10%")
    seq_len: int = Field(512, ge=8, description="tokens per training sequence")
    batch_size: int = Field(1, ge=1, description="sequences per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW weight decay")
    seed: int | None = Field(None, description="data order and LoRA init (default: the recipe's seed)")
    text: TextSource = Field(
        "pydoc", description="text source (train part): pydoc, docs, a .txt/.jsonl file, or hf:NAME[:CONFIG]"
    )
    loss: Literal["ce", "kl"] = Field(
        "ce", description="ce: next-token cross-entropy; kl: distil the teacher's distributions (mixed with ce)"
    )
    kl_weight: float = Field(1.0, ge=0, le=1, description="loss kl: weight of the KL term; the rest is cross-entropy")
    teacher: str | None = Field(None, description="loss kl: the model to distil (in a recipe: the recipe's model)")
    top_k: int = Field(128, ge=1, description="loss kl: teacher log-probs kept per position (the tail is lumped)")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, description="module names LoRA adapts"
    )
    trainable: list[str] | None = Field(
        None,
        min_length=1,
        description="full: glob patterns of parameter names to train (e.g. '*.self_attn.*', '*norm*'); default all",
    )

    @model_validator(mode="after")
    def _method_fields(self) -> Finetune:
        if self.method == "lora" and self.trainable is not None:
            raise ValueError("trainable applies to method full; LoRA trains the adapters on target_modules")
        stray = sorted({"kl_weight", "teacher", "top_k"} & self.model_fields_set) if self.loss == "ce" else []
        if stray:
            raise ValueError(f"{', '.join(stray)} applies to loss kl; add loss: kl or remove it")
        if self.loss == "kl" and self.kl_weight == 0:
            raise ValueError("loss kl with kl_weight 0 is plain cross-entropy; use loss: ce")
        return self


def select_trainable(model: torch.nn.Module, patterns: list[str] | None) -> int:
    """Freeze every parameter not matching one of `patterns`; returns the trainable count."""
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(patterns is None or any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
        count += p.numel() if p.requires_grad else 0
    if count == 0:
        raise SurgeryError(
            f"finetune: no parameter matches trainable {patterns}; names look like 'model.layers.0.self_attn.k_proj.weight'"
        )
    return count


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def attach_trainable(model: torch.nn.Module, settings: Finetune) -> tuple[torch.nn.Module, int]:
    """(the module to train, its trainable parameter count): the model with LoRA adapters on
    `target_modules` (everything else frozen), or the model itself with `trainable` selected."""
    if settings.method != "lora":
        return model, select_trainable(model, settings.trainable)
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        adapted = get_peft_model(model, config)
    except ValueError as err:
        raise SurgeryError(f"finetune: LoRA could not attach ({err}); check target_modules") from None
    return adapted, sum(p.numel() for p in adapted.parameters() if p.requires_grad)


def distill_loss(logits: torch.Tensor, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean KL(teacher ‖ model) per predicted position, from the teacher's top-k statistics of the
    same blocks (B, T-1, k) and the model's logits (B, T, V), the tail lumped (see lumped_kl)."""
    from surgery.evaluate.divergence import lumped_kl

    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    kl, _, _ = lumped_kl(teacher["topk_ids"].long(), teacher["topk_logp"].float(), logq)
    return kl.mean()


def batch_loss(wrapped: Any, ids: torch.Tensor, teacher: dict[str, torch.Tensor] | None, settings: Finetune):
    """The training loss of one micro-batch: cross-entropy, or KL toward the teacher mixed with it."""
    if teacher is None:
        return wrapped(input_ids=ids, labels=ids).loss
    logits = wrapped(input_ids=ids).logits
    loss = settings.kl_weight * distill_loss(logits, teacher)
    if settings.kl_weight < 1:
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss = loss + (1 - settings.kl_weight) * ce
    return loss


def train_steps(
    accelerator: Any,
    wrapped: Any,
    optimizer: Any,
    scheduler: Any,
    loader: Any,
    settings: Finetune,
    teacher: dict[str, torch.Tensor] | None = None,
) -> list[float]:
    """`max_steps` optimizer steps over `loader` (cycled; batches of token blocks with their row
    indices, which pick the teacher's statistics of the same blocks); the loss of each step,
    averaged over its micro-batches and gathered across processes."""
    from surgery.io import progress

    losses: list[float] = []
    batches = iter(loader)
    bar = progress(settings.max_steps, "finetune", "step")
    if not accelerator.is_local_main_process:  # one bar per machine
        bar.disable = True
    for _ in range(settings.max_steps):
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(settings.grad_accum):
            try:
                batch = next(batches)
            except StopIteration:  # another epoch over the train text
                batches = iter(loader)
                batch = next(batches)
            ids, index = batch
            with accelerator.accumulate(wrapped):
                stats = {k: v[index.cpu()].to(ids.device) for k, v in teacher.items()} if teacher else None
                loss = batch_loss(wrapped, ids, stats, settings)
                accelerator.backward(loss)
                optimizer.step()  # skipped by accelerate until the last micro-batch of the step
                if accelerator.sync_gradients:
                    scheduler.step()  # once per optimizer step, whatever the number of processes
                optimizer.zero_grad()
            step_loss += loss.detach() / settings.grad_accum
        losses.append(accelerator.gather(step_loss[None]).mean().item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # before the update: a logged line carries it
        bar.update(1)
    bar.close()
    return losses


def used_blocks(blocks: torch.Tensor, settings: Finetune, processes: int, seed: int) -> torch.Tensor:
    """The blocks a run of `max_steps` can reach: all of them when it goes over the text at least
    once, else a seeded sample of the sequences it needs (so a distillation teacher is run over
    what training reads, not over the whole text)."""
    needed = settings.max_steps * settings.grad_accum * settings.batch_size * processes
    if needed >= len(blocks):
        return blocks
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:needed]
    return blocks[pick.sort().values]


def teacher_stats(blocks: torch.Tensor, settings: Finetune, teacher: str | None, model: torch.nn.Module, dtype):
    """The teacher's top-k statistics over the training blocks (cached by teacher and token ids).
    They are held in memory during training: blocks x seq_len x top_k x 8 bytes (200 blocks of 512
    tokens at top_k 128: 105 MB); lower top_k for long runs."""
    from surgery.evaluate.divergence import reference_topk

    if not teacher:
        raise SurgeryError(
            "finetune loss kl needs a teacher: set teacher: MODEL (in a recipe it is the recipe's model)"
        )
    vocab = model.get_output_embeddings().weight.shape[0]
    return reference_topk(teacher, blocks, settings.top_k, dtype, vocab, note=f"finetune {settings.text}")


@contextlib.contextmanager
def make_accelerator(settings: Finetune) -> Iterator[Any]:
    """The Accelerator of one finetune. Under `accelerate launch` with an FSDP config on CPU
    processes, where accelerate itself would fall back to plain data parallelism, FSDP is turned
    on from the same config for the finetune (and off after it), so CPU runs shard exactly as
    accelerator runs do."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    accelerator = Accelerator(gradient_accumulation_steps=settings.grad_accum, cpu=not torch.cuda.is_available())
    state = accelerator.state
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    on_cpu = fsdp_asked and state.distributed_type == DistributedType.MULTI_CPU
    try:
        if on_cpu:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* settings
        if state.distributed_type == DistributedType.FSDP and state.fsdp_plugin.fsdp_version != 2:
            raise SurgeryError(
                "finetune under FSDP needs fsdp_version: 2 in the accelerate config (or --fsdp_version 2); "
                "see configs/accelerate/fsdp-8gpu.yaml"
            )
        yield accelerator
    finally:
        accelerator.free_memory()
        if on_cpu:
            state.distributed_type, state.fsdp_plugin = DistributedType.MULTI_CPU, None


def is_sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.state.distributed_type == DistributedType.FSDP


def gather_full(wrapped: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy the trained weights of an FSDP2-sharded module into `target`, a plain module of the same
    structure, one tensor at a time on every process (peak: one full tensor beyond the shards)."""
    from torch.distributed.tensor import DTensor

    into = target.state_dict()
    with torch.no_grad():
        for name, value in wrapped.state_dict().items():
            name = name.removeprefix("_orig_mod.")  # under torch.compile (dynamo in the accelerate config)
            if name not in into:
                raise SurgeryError(f"finetune: the sharded model holds {name!r}, which the model does not")
            full = value.full_tensor() if isinstance(value, DTensor) else value
            into[name].copy_(full)


def run_finetune(
    model: torch.nn.Module, tokenizer: Any, settings: Finetune, seed: int = 0, teacher: str | None = None
) -> dict[str, Any]:
    """Train `model` in place; returns {"losses", "seconds", "tokens", "trainable", "processes",
    "parallel" (none, data or fsdp)}. LoRA adapters
    are merged and removed afterwards, so `model` stays a plain transformers model; every
    parameter's requires_grad flag and the train/eval mode are restored. With loss kl the teacher
    is `settings.teacher`, else `teacher` (a recipe passes its starting model)."""
    if tokenizer is None:
        raise SurgeryError("finetune needs the model's tokenizer to read its training text")
    seed = settings.seed if settings.seed is not None else seed
    with make_accelerator(settings) as accelerator:
        return train_model(accelerator, model, tokenizer, settings, seed, teacher)


def train_model(
    accelerator: Any, model: torch.nn.Module, tokenizer: Any, settings: Finetune, seed: int, teacher: str | None
) -> dict[str, Any]:
    """run_finetune's body, on `accelerator`."""
    from accelerate.utils import set_seed

    sharded = is_sharded(accelerator)
    set_seed(seed)
    blocks = used_blocks(
        token_blocks(tokenizer, settings.text, settings.seq_len), settings, accelerator.num_processes, seed
    )
    stats = None
    if settings.loss == "kl":
        dtype = next(model.parameters()).dtype
        with accelerator.main_process_first():  # the main process computes and caches, the others read
            stats = teacher_stats(blocks, settings, settings.teacher or teacher, model, dtype)
    generator = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(blocks, torch.arange(len(blocks)))
    loader = torch.utils.data.DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=generator)

    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    trainable_model, trainable = attach_trainable(model, settings)
    # FSDP rewrites the module it shards (parameters become shards), so it shards a copy
    training = copy.deepcopy(trainable_model) if sharded else trainable_model
    params = [p for p in training.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # stepped by train_steps once per optimizer step: accelerate's prepared scheduler would step once
    # per process, running the warm-up and decay faster the more processes there are
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings.warmup_steps, settings.max_steps))
    training.train()
    wrapped, optimizer, loader = accelerator.prepare(training, optimizer, loader)
    start = time.perf_counter()
    losses = train_steps(accelerator, wrapped, optimizer, scheduler, loader, settings, stats)
    seconds = time.perf_counter() - start

    if sharded:  # else the model was trained in place
        gather_full(wrapped, trainable_model)
        del wrapped, optimizer, training
    else:  # drop accelerate's mixed-precision forward wrapper: later evals run as the baseline did
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    if settings.method == "lora":
        trainable_model.merge_and_unload()  # the LoRA layers of `model` are replaced by merged Linears in place
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))
    model.train(was_training)
    tokens = (
        settings.max_steps * settings.grad_accum * settings.batch_size * settings.seq_len * accelerator.num_processes
    )
    if accelerator.is_main_process:
        log.info("finetune: %d steps, loss %.3f -> %.3f, %.0f s", settings.max_steps, losses[0], losses[-1], seconds)
    processes = accelerator.num_processes
    parallel = "fsdp" if sharded else "data" if processes > 1 else "none"
    return {
        "losses": losses,
        "seconds": seconds,
        "tokens": tokens,
        "trainable": trainable,
        "processes": processes,
        "parallel": parallel,
    }
