"""The plain training loop that drives :class:`LayerSelector`: LoRA wrapping, data parallelism over several
processes (:mod:`.parallel`), checkpoints written atomically, a stop with a clear message when the loss turns
NaN, and the most units that fit a share of full fine-tuning's optimizer memory (:func:`max_active`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerControl, TrainerState

from ..configs import TuneConfig
from ..data import Windows
from ..errors import LayerwiseError
from ..io import atomic_dir
from ..loading import LoadedModel
from ..memory import rss_bytes

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel

    from ..loading import CausalLM

    #: A transformers model, or one peft wraps (LoRA).
    Tunable = CausalLM | PeftModel
from .data import TuneData
from .experts import check_sparse, expert_tensors, plain_state_dict
from .parallel import accelerator, is_main_process
from .selection import LayerSelector, _is_peft, parse_select
from .snapshot import Snapshot


@dataclass
class TuneRun:
    """One strategy's training: per-step loss and records, the selector, and the model it trained."""

    key: str
    losses: list[float]
    records: list[dict]
    seconds: float
    selector: LayerSelector
    model: Tunable
    memory_start: int
    start: Snapshot | None = None  # a peft model's adapter weights before training (the base model is them at init)
    unit_lr: dict[str, float] = field(default_factory=dict)  # each unit's learning rate, read back from the optimizer

    def summary(self) -> dict:
        steps = max(len(self.losses), 1)
        peak = max((r["memory_bytes"] for r in self.records), default=0)
        return {
            "steps": len(self.losses),
            "loss": self.losses,
            "seconds_per_step": self.seconds / steps,
            "memory_start_bytes": self.memory_start,
            "memory_added_bytes": max(peak - self.memory_start, 0),
            "trainable_params_max": max((r["trainable_params"] for r in self.records), default=0),
            "optimizer_state_bytes_max": max((r["optimizer_state_bytes"] for r in self.records), default=0),
            "memory_bytes_max": max((r["memory_bytes"] for r in self.records), default=0),
            "unit_lr": self.unit_lr,
            "units": list(self.selector.params),
            "records": self.records,
        }


def max_active(model: nn.Module, unit: str = "block", share: float = 0.5, train_embeddings: bool = True) -> int:
    """The most units that may train at once with optimizer state at most ``share`` of full fine-tuning's.

    AdamW keeps two moments per trainable parameter, so its state is in
    proportion to the trainable count, counted as the selector counts it:
    the units' parameters plus embeddings, final norm and head (tied once),
    against every unit and those for ``full``. The largest units are assumed
    drawn together, so the bound holds whichever are sampled.
    """
    sel = LayerSelector("full", unit, train_embeddings=train_embeddings)
    with expert_tensors(model) if unit == "expert" else contextlib.nullcontext():
        sizes = sorted((sum(p.numel() for p in ps) for ps in sel.units(model).values()), reverse=True)
    fixed = sum(p.numel() for p in sel.always_params(model))
    budget = share * (sum(sizes) + fixed) - fixed
    k = 0
    while k < len(sizes) and sum(sizes[: k + 1]) <= budget:
        k += 1
    if k == 0:
        raise LayerwiseError(
            f"not even one {unit} unit fits in {share:g} of full fine-tuning's optimizer state; raise share or "
            "freeze embeddings"
        )
    return k


def with_lora(model: CausalLM, rank: int = 8) -> PeftModel:
    """A peft LoRA model over every linear map of the blocks (peft's ``all-linear`` leaves the head out)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LayerwiseError("select lora (and adaptive over LoRA) needs peft: pip install peft") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"))


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Example indices, a fresh seeded permutation per pass over the data."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i : i + batch_size]
        epoch += 1


def save_model(model: Tunable, tokenizer, out: str | Path) -> Path:
    """A plain HF checkpoint (safetensors), or a PEFT adapter for a peft model, written atomically; of several
    processes (which hold the same weights) only the first writes it."""
    if not is_main_process(next(model.parameters()).device):
        return Path(out)
    plain = plain_state_dict(model)  # while training by expert: the experts' tensors whole again
    whole: dict[str, Any] = {} if plain is None else {"state_dict": plain}
    with atomic_dir(out, "checkpoint") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, **whole)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def train(
    lm: LoadedModel,
    data: TuneData | Windows,
    config: TuneConfig | None = None,
    *,
    weights: dict[str, float] | None = None,
    rates: dict[str, float] | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    **settings: Any,
) -> TuneRun:
    """Train ``lm.model`` in place with the config's one selection strategy (AdamW, constant learning rate);
    ``settings`` are config fields (``select="lisa", steps=50``).

    ``select="lora"`` (or ``lora=True`` with any select, IST's setting for
    ``adaptive``) wraps the model in a peft LoRA adapter first; the returned
    run's ``model`` is then the peft model. A non-finite loss stops with the
    step named; the weights then are still those of the last good step, and
    are written to ``checkpoint`` when one is given (so are they every
    ``save_every`` steps, atomically, so Ctrl-C leaves the last complete one).
    ``rates`` (from :func:`layer_rates`) gives every unit its own learning
    rate ``lr × rates[unit]`` in its own parameter group (on a LoRA model:
    its adapters'); embeddings, norms and head keep ``lr``. The rates the
    optimizer held at the end are in the run's ``unit_lr``.

    Started as several processes (``accelerate launch``, ``torchrun``), it
    trains with DDP (:mod:`.parallel`): ``batch_size`` examples per process
    and step, every process a different slice of one seeded global batch,
    gradients averaged, so the weights stay the same in every process and
    equal one process's with ``batch_size × processes`` examples (the loss
    being a mean over equally many tokens per process: text windows; chat
    examples weigh their tokens per process). Losses are the mean over
    processes; only the first process writes checkpoints.
    """
    lm.check_resident("tune")
    cfg = TuneConfig.of(config, **settings)
    if len(cfg.select) != 1:
        raise LayerwiseError(f"train runs one strategy; `select` names {len(cfg.select)} ({', '.join(cfg.select)})")
    select, unit, seed, lr = cfg.select[0], cfg.unit, cfg.seed, cfg.lr
    sel = parse_select(select)
    check_sparse(lm.anatomy, unit)
    data = TuneData.from_windows(data) if isinstance(data, Windows) else data
    acc = accelerator(lm.device)
    per_process = _per_process(int(data.ids.shape[0]), cfg.batch_size, acc.num_processes)
    lm.model.requires_grad_(True)  # every unit in the optimizer; the selector freezes what does not train now
    torch.manual_seed(seed)  # LoRA's initial adapters too: the same in every process
    model = with_lora(lm.model, cfg.lora_rank) if (cfg.lora or sel.mode == "lora") else lm.model
    selector = LayerSelector(
        "full" if sel.mode == "lora" else select,
        unit,
        cfg.active,
        cfg.interval,
        cfg.temperature,
        weights,
        seed,
        cfg.train_embeddings,
    )
    start = Snapshot([p for p in model.parameters() if p.requires_grad]) if _is_peft(model) else None
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    mem0 = torch.cuda.memory_allocated(lm.device) if lm.device.type == "cuda" else rss_bytes()
    t0 = time.perf_counter()
    with expert_tensors(lm.model) if unit == "expert" else contextlib.nullcontext():  # each expert a tensor apart
        optimizer = torch.optim.AdamW(selector.param_groups(model, lr, rates), lr=lr, weight_decay=0.0)
        selector.bind(model, optimizer)  # what never trains is frozen now, so DDP leaves it out of its buckets
        order = _batches(int(data.ids.shape[0]), per_process * acc.num_processes, seed)
        desc = f"tune {sel.key}" if progress and acc.is_main_process else None
        losses = _loop(lm, model, selector, optimizer, data, order, cfg, acc, checkpoint, desc)
    unit_lr = {g["name"]: g["lr"] for g in optimizer.param_groups if g["name"] != "rest"} if rates is not None else {}
    return TuneRun(
        sel.key + ("" if sel.mode == "lora" or not cfg.lora else "+lora"),
        losses,
        selector.records,
        time.perf_counter() - t0,
        selector,
        model,
        mem0,
        start,
        unit_lr,
    )


def _loop(
    lm: LoadedModel,
    model: Tunable,
    selector: LayerSelector,
    optimizer: torch.optim.Optimizer,
    data: TuneData,
    order: Iterator[torch.Tensor],
    cfg: TuneConfig,
    acc: Accelerator,
    checkpoint: str | Path | None,
    desc: str | None,
) -> list[float]:
    """The optimizer steps of :func:`train` on the batches ``order`` draws, driving the selector's events as a Trainer
    would, with a progress bar named ``desc`` (none without); the per-step losses. The optimizer's state is freed at
    the end."""
    ddp = acc.prepare_model(model)  # before the selector switches units off (see .parallel)
    state, control = TrainerState(), TrainerControl()
    selector.on_train_begin(None, state, control, model=model, optimizer=optimizer)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=desc is None)
    try:
        for step in bar:
            state.global_step = step
            selector.on_step_begin(None, state, control, model=model, optimizer=optimizer)
            total = 0.0
            for i in range(cfg.grad_accum):  # gradients are all-reduced after the last micro-batch only
                with acc.no_sync(ddp) if i < cfg.grad_accum - 1 else contextlib.nullcontext():
                    loss = _backward(acc, ddp, data, next(order), cfg.grad_accum, lm.device)
                if loss is None:
                    _stop_on_nan(model, lm.tokenizer, step, checkpoint)
                total += loss / cfg.grad_accum
            if cfg.max_grad_norm:
                clip = [p for p in model.parameters() if p.grad is not None]
                acc.clip_grad_norm_(clip, cfg.max_grad_norm)
            selector.on_pre_optimizer_step(None, state, control, model=model, optimizer=optimizer)
            optimizer.step()
            selector.on_optimizer_step(None, state, control, model=model, optimizer=optimizer)
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.3f}")
            if checkpoint is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_model(model, lm.tokenizer, checkpoint)
    finally:
        model.eval()
        del ddp
        if acc.num_processes > 1:  # DDP's hooks on the parameters go with its last reference, the accelerator's
            acc.free_memory()  # (a garbage-collection pass, so only when there is a DDP to drop)
    optimizer.state.clear()
    return losses


def _per_process(n: int, batch_size: int, processes: int) -> int:
    """Examples per process and micro-batch: ``batch_size``, or fewer when the data has fewer for each process."""
    if n == 0:
        raise LayerwiseError("no training examples; give more data")
    if n < processes:
        raise LayerwiseError(f"{processes} processes need a training example each, and there are {n}; give more data")
    return min(batch_size, n // processes)


def _backward(
    acc: Accelerator, ddp: nn.Module, data: TuneData, batch: torch.Tensor, accum: int, dev: torch.device
) -> float | None:
    """Forward and backward this process's slice of ``batch``; the loss averaged over processes, or None (in every
    process alike, before any gradient) when it is not finite."""
    with acc.split_between_processes(batch) as idx:
        loss = ddp(
            input_ids=data.ids[idx].to(dev),
            attention_mask=data.mask[idx].to(dev),
            labels=data.labels[idx].to(dev),
            use_cache=False,
        ).loss
    mean = acc.reduce(loss.detach(), "mean")
    if not torch.isfinite(mean):
        return None
    acc.backward(loss / accum)
    return float(mean)


def _stop_on_nan(model: Tunable, tokenizer, step: int, checkpoint: str | Path | None) -> NoReturn:
    """The loss is not finite before this step's update: the weights are the last good ones; keep them and stop."""
    if checkpoint is not None:
        save_model(model, tokenizer, checkpoint)
        kept = f"the weights after step {step} (the last good ones) are in {checkpoint}"
    else:
        kept = "no checkpoint was asked for"
    raise LayerwiseError(
        f"the training loss became NaN/inf at step {step + 1}; {kept}; lower the learning rate (--lr) or use "
        "--dtype float32"
    )
