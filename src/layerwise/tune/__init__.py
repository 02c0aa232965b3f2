"""Layer-selective fine-tuning: train only the units that matter, with optimizer memory really saved.

One concern a module: :mod:`.selection` (which units train when), :mod:`.data` (what trains), :mod:`.snapshot`
(the weights from before, and restoring blocks), :mod:`.loop` (the plain training loop), :mod:`.parallel` (the same
loop over several processes, DDP), :mod:`.evaluation` (gain and forgetting) and :mod:`.command` (a whole
``layerwise tune`` run).

Selection lives in one place, :class:`LayerSelector`, a ``transformers``
``TrainerCallback``: a user adds it to their own ``Trainer``, and the plain
loop here (:func:`train`) drives the very same object. Modes (``select``):

- ``full``: every unit trains (the baseline; ``lora`` is ``full`` over a peft LoRA model);
- ``lisa``: every ``interval`` steps, ``active`` units drawn uniformly (LISA);
- ``importance:METRIC``: drawn with probability ∝ importance^τ from a Profile
  (``temperature`` τ; τ = 0 is LISA);
- ``top:METRIC``: the ``active`` most important units, fixed;
- ``adaptive``: IST-style scores learned online: after each optimizer step a
  trained unit's score moves (EMA) toward the loss decrease its own update
  achieved to first order, ``-<g_u, Δθ_u>``; units are drawn ∝ score^τ, with
  10% uniform exploration, never-trained units counting as the best seen;
- ``badam:ascending|descending|random``: BAdam's block coordinate descent, the
  next ``active`` units in that order every ``interval`` steps.

Memory is real, by construction rather than by care:

- the optimizer is built once over every tunable parameter, so a unit switched
  on later is always in it; the selector refuses an optimizer that lacks any of
  them (the widely copied LISA bug, where blocks frozen when the optimizer was
  built are never updated, cannot happen silently);
- a frozen parameter has ``requires_grad=False``, so it gets no ``.grad``, and
  AdamW skips parameters without a gradient, so it never gets state;
- when a unit is switched off its Adam state is deleted (freed); when it comes
  back its state is *reset* (fresh moments, step count from zero, as BAdam does).

Units (``unit``) are blocks, attention or MLP sublayers, or in a mixture-of-experts
model each routed expert (``L3.mlp.e5``) or each sparse block's router (``L3.router``).
An expert's weights are slices of tensors its block's experts share, so while the
model trains by expert each expert's slices are parameters of their own
(:func:`expert_tensors`, :mod:`.experts`): a frozen expert gets no gradient and no
optimizer state, and the model is whole again afterwards.

Embeddings, final norm and head (tied in SmolLM2: one tensor, counted once)
train with every mode unless ``train_embeddings=False``. With ``unit="attn"``
or ``"mlp"`` the block norms stay frozen. On a peft model only the adapter
parameters are tunable (IST's setting), and peft keeps embeddings frozen.

Per-unit learning rates (``layer_lr="METRIC[:TAU]"``, :func:`layer_rates`)
are the Profile's other use: every unit (block, or attn/mlp with ``unit``)
gets its own AdamW parameter group at ``lr × w_k``, ``w_k ∝ importance_k^τ``
scaled to mean 1 over units, so the step budget matches a flat ``lr``;
embeddings, norms and head keep ``lr``. τ > 0 (default 1) speeds up the
important units, τ < 0 slows them (protects them). Selection only flips
``requires_grad`` and drops state, never the groups, so the rates hold under
every ``select``, and over LoRA they apply to each unit's adapters.

bf16: load the model in bfloat16 (``dtype="bfloat16"``, ``--dtype bfloat16``)
and it trains in bf16 as it is: weights, gradients and AdamW moments all in
bf16 (no float32 master copy, so updates smaller than half a bf16 step of a
weight are lost: prefer a larger ``lr`` or float32 for very small rates); the
checkpoint is saved in bf16 too (safetensors tensors and ``config.json``
``dtype``). Verified on CPU only (tests: the training loss falls on a tiny
model and on the default model; the tiny model's checkpoint is bf16); no
CUDA device was available to verify it there.

The schedule is a function of (seed, step) for every mode except
``adaptive``, whose scores and current units are saved with a Trainer
checkpoint (``ExportableState``), so resuming keeps the schedule.
"""

from .command import TuneReport, restore_order_blocks, run
from .data import Chats, TuneData, read_tuning, tuning_data
from .evaluation import distinct_n, diversity, evaluate
from .experts import check_sparse, expert_tensors, part_params
from .loop import TuneRun, max_active, save_model, train, with_lora
from .selection import (
    BADAM_ORDERS,
    EXPLORE,
    LAYER_LR_FLOOR,
    MODES,
    RESTORE_ORDERS,
    SELECT_HELP,
    UNITS,
    LayerSelector,
    Selection,
    importance_weights,
    layer_rates,
    optimizer_state_bytes,
    parse_layer_lr,
    parse_select,
)
from .snapshot import Snapshot, block_params, restore_order

__all__ = [
    "BADAM_ORDERS",
    "EXPLORE",
    "LAYER_LR_FLOOR",
    "MODES",
    "RESTORE_ORDERS",
    "SELECT_HELP",
    "UNITS",
    "Chats",
    "LayerSelector",
    "Selection",
    "Snapshot",
    "TuneData",
    "TuneReport",
    "TuneRun",
    "block_params",
    "check_sparse",
    "distinct_n",
    "diversity",
    "evaluate",
    "expert_tensors",
    "importance_weights",
    "layer_rates",
    "max_active",
    "optimizer_state_bytes",
    "parse_layer_lr",
    "parse_select",
    "part_params",
    "read_tuning",
    "restore_order",
    "restore_order_blocks",
    "run",
    "save_model",
    "train",
    "tuning_data",
    "with_lora",
]
