"""The box each page opens with: what the result says to do, read from the saved data alone.

Every figure here is chosen by small pure functions over a result (a Profile, a
drop or quantize report) so that tests check them on tiny models; the model is
never run. The command lines suggested are real ones of the current CLI (a test
parses them with ``layerwise.cli._parser``), so a reader can paste them.
"""

from __future__ import annotations

import shlex
from html import escape
from typing import TYPE_CHECKING

from ..plans import EXPORTS
from ..profile import DIRECTION, Profile
from .page import fmt

if TYPE_CHECKING:
    from ..drop import DropReport
    from ..quantize import QuantReport

#: How many units the profile summary names at each end, and drops in its suggestion (the CLI's own default).
_SHOWN, _DROP_N = 3, 4
#: Budgets the quantize suggestion sweeps: the CLI's help example, inside every format's range.
_QUANT_SWEEP = "4.6,5,5.5"


def box(title: str, items: list[str]) -> str:
    """The summary's HTML: a shaded box of bullet points (``items`` are already-escaped HTML)."""
    lis = "".join(f"<li>{i}</li>" for i in items)
    return f'<div class="summary"><h2>{escape(title)}</h2><ul>{lis}</ul></div>'


def cmd(command: str) -> str:
    return f"<code>{escape(command)}</code>"


def _model_args(meta: dict) -> list[str]:
    """``--model REF`` unless the result came from the default model (the CLI's default)."""
    ref = meta.get("ref")
    return [] if ref in (None, "default") else ["--model", str(ref)]


def reference(prof: Profile) -> str | None:
    """The causal metric the profile ranks by: exact ablation when measured, else the Taylor estimate."""
    ref = prof.agreement.get("reference") or "ablate_nll"
    return ref if any(u.metrics.get(ref) is not None for u in prof.units) else None


def extremes(
    prof: Profile, k: int = _SHOWN
) -> tuple[list[tuple[str, float, float | None]], list[tuple[str, float, float | None]]]:
    """The ``k`` least and ``k`` most important units by the reference metric: (name, cost, its SE or None)."""
    ref = reference(prof)
    if ref is None:
        return [], []
    rows = sorted(
        ((u.name, float(v), u.details.get(f"{ref}_se")) for u in prof.units if (v := u.metrics.get(ref)) is not None),
        key=lambda r: r[1],
    )
    return rows[:k], rows[::-1][:k]


def best_metric(prof: Profile, kind: str) -> tuple[str, float] | None:
    """The cheap metric whose ranking of ``kind`` units agrees best with the reference (largest |Spearman rho|)."""
    row = prof.agreement.get("by_kind", {}).get(kind, {})
    scored = [
        (m, v["rho"]) for m, v in row.items() if v.get("rho") is not None and m not in ("ablate_nll", "ablate_kl")
    ]
    return max(scored, key=lambda mr: abs(mr[1]), default=None)


def as_order(metric: str, rho: float) -> str:
    """``metric`` as a drop order / ranked strategy: a metric with no importance direction gets the end that
    agreed with ablation (positive rho: low values matter least, ``:asc``)."""
    return metric if DIRECTION.get(metric, 0) * rho > 0 else f"{metric}:{'asc' if rho > 0 else 'desc'}"


def cheapest_kind(prof: Profile, n: int = _DROP_N) -> str | None:
    """The unit kind whose ``n`` cheapest units cost least in total by the reference metric (a kind needs more
    than ``n`` units to drop ``n`` and keep one)."""
    ref = reference(prof)
    totals = {}
    for kind in ("block", "attn", "mlp"):
        vals = sorted(float(v) for u in prof.units if u.kind == kind and ref and (v := u.metrics.get(ref)) is not None)
        if len(vals) > n:
            totals[kind] = sum(vals[:n])
    return min(totals, key=totals.__getitem__, default=None)


def profile_commands(prof: Profile, path: str) -> list[tuple[str, str]]:
    """The drop and quantize command lines this profile suggests, each with what it does (no drop suggestion
    without a reference metric)."""
    ref, kind = reference(prof), cheapest_kind(prof)
    model = _model_args(prof.meta)
    cmds = []
    if ref and kind:
        cmds.append(
            (
                f"Drop the {_DROP_N} cheapest {kind} units by {ref}",
                shlex.join(
                    [
                        "layerwise",
                        "drop",
                        *model,
                        "--n",
                        str(_DROP_N),
                        "--unit",
                        kind,
                        "--order",
                        ref,
                        "--profile",
                        path,
                    ]
                ),
            )
        )
        if (best := best_metric(prof, kind)) is not None:
            cmds.append(
                (
                    f"The same by {best[0]}, the cheap metric that agreed best (it needs no exact ablation)",
                    shlex.join(
                        [
                            "layerwise",
                            "drop",
                            *model,
                            "--n",
                            str(_DROP_N),
                            "--unit",
                            kind,
                            "--order",
                            as_order(*best),
                            "--profile",
                            path,
                        ]
                    ),
                )
            )
    b = best_metric(prof, "block")
    strategies = ["measured"] + ([f"ranked:{as_order(*b)}"] if b else []) + ["uniform"]
    cmds.append(
        (
            "Quantize, comparing the measured plan"
            + (f" with blocks ranked by {b[0]}" if b else "")
            + " and uniform bits",
            shlex.join(
                [
                    "layerwise",
                    "quantize",
                    *model,
                    "--sweep",
                    _QUANT_SWEEP,
                    "--strategy",
                    ",".join(strategies),
                    "--profile",
                    path,
                ]
            ),
        )
    )
    return cmds


def _cost(row: tuple[str, float, float | None]) -> str:
    name, v, se = row
    return f"<code>{escape(name)}</code> {fmt(v)}" + (f" ± {fmt(se)}" if se is not None else "")


def profile_summary(prof: Profile, path: str = "profile.json") -> str:
    """The profile page's opening box; ``path`` is the profile.json the suggested commands read."""
    ref = reference(prof)
    if ref is None:
        return box(
            "Summary",
            [
                "No causal metric was measured (<code>--ablation none</code>); profile with "
                "<code>--ablation exact</code> to rank units and get suggestions."
            ],
        )
    least, most = extremes(prof)
    items = [
        f"Least important by <code>{escape(ref)}</code> (the rise in NLL, nats, on the profile's windows when the "
        "unit is removed): " + ", ".join(_cost(r) for r in least) + ".",
        "Most important: " + ", ".join(_cost(r) for r in most) + ".",
    ]
    agree = []
    for kind in ("block", "attn", "mlp"):
        if (b := best_metric(prof, kind)) is not None:
            agree.append(f"{escape(kind)}: <code>{escape(b[0])}</code> (rho {b[1]:+.2f})")
    if agree:
        items.append(
            f"Cheap metric that tracks <code>{escape(ref)}</code> best on this model, per unit kind: "
            + "; ".join(agree)
            + "."
        )
    items += [f"{escape(why)}: {cmd(c)}" for why, c in profile_commands(prof, path)]
    if cheapest_kind(prof):
        items.append(
            "Single-unit costs do not add up exactly when several units go; the drop page reports the held-out cost."
        )
    return box("Summary", items)


def best_per(rows: list[dict], group: str) -> list[dict]:
    """The row with the lowest held-out ``delta_nll`` for each value of ``group`` (unit count or budget), in order."""
    best: dict = {}
    for r in rows:
        g = r.get(group)
        if r.get("delta_nll") is not None and (g not in best or r["delta_nll"] < best[g]["delta_nll"]):
            best[g] = r
    return [best[g] for g in sorted(best, key=lambda g: (g is None, g if g is not None else 0))]


def _cost_line(r: dict, original: dict) -> str:
    """Held-out cost of one plan against the original, as the page's table words it."""
    return (
        f"Δnll {r['delta_nll']:+.4f} ± {fmt(r.get('delta_nll_se'))} nats, KL {fmt(r.get('kl'))}, perplexity "
        f"{fmt(r.get('ppl'))} (original {fmt(original.get('ppl'))})"
    )


def _files(exports: dict) -> list[str]:
    """The files the run wrote, to use as they are."""
    return [f"File to use ({escape(k)}): <code>{escape(str(v.get('path')))}</code>" for k, v in exports.items()]


def _write_it(exports: dict, command: str, why: str = "write it") -> str:
    """How to get a chosen plan's file when the run saved none (a sweep saves no model)."""
    return "" if exports else f"<br>No model saved (a sweep); {escape(why)} with {cmd(command)}"


def drop_export_command(report: DropReport, key: str, plan_path: str) -> str:
    export = "hf,gguf" if report.meta.get("gguf_path") else "hf"
    return shlex.join(
        ["layerwise", "drop", *_model_args(report.meta), "--plan", f"{plan_path}#{key}", "--export", export]
    )


def drop_summary(report: DropReport, plan_path: str = "plan.json") -> str:
    """The drop page's opening box: the best held-out plan per unit count, its size and cost, and the file."""
    o, chosen = report.original, best_per(report.variants, "n")
    items = [
        f"<b>{r['n']} unit{'s' if r['n'] != 1 else ''}</b>: <code>{escape(r['key'])}</code> drops "
        f"{escape(', '.join(r['units']))}; {r['params_ratio']:.1%} of the parameters; {_cost_line(r, o)}."
        + _write_it(report.exports, drop_export_command(report, r["key"], plan_path))
        for r in chosen
    ]
    if len(report.variants) > len(chosen):
        items.append(
            "Each count shows the plan with the lowest held-out Δnll of those compared; the table below has every plan."
        )
    return box("Summary", items + _files(report.exports))


def quant_export_command(report: QuantReport, row: dict, plan_path: str) -> tuple[str, str]:
    """(why, command) that writes one row's plan: ``--plan ... --export`` of the saved plan, or, for integer codes
    with zero points (the hf export stores symmetric codes only), the same budget and strategy measured again
    with ``--symmetric``."""
    meta, model = report.meta, _model_args(report.meta)
    groups = report.plans.get(row["plan"], {}).get("groups", {})
    if meta.get("format") == "int" and any(str(g.get("config", "")).startswith("a") for g in groups.values()):
        method = ["--method", meta["method"]] if meta.get("method") in ("rtn", "gptq") else []
        return (
            "its codes have zero points, which the hf export cannot store; measure it again with symmetric codes",
            shlex.join(
                [
                    "layerwise",
                    "quantize",
                    *model,
                    "--format",
                    "int",
                    *method,
                    "--symmetric",
                    "--bits",
                    f"{row['target_bpw']:g}",
                    "--strategy",
                    row["strategy"],
                    "--export",
                    "hf",
                ]
            ),
        )
    export = ",".join(EXPORTS.get(meta.get("format", "gguf"), ("gguf",)))
    return "write it", shlex.join(
        ["layerwise", "quantize", *model, "--plan", f"{plan_path}#{row['plan']}", "--export", export]
    )


def quant_summary(report: QuantReport, plan_path: str = "plan.json") -> str:
    """The quantize page's opening box: the best held-out plan per budget, its size and cost, and the file."""
    o = report.original
    # uniform levels are fixed reference points (one per candidate), shown in the table and the plot, not chosen here
    budgeted = [r for r in report.rows if not r["strategy"].startswith("uniform")]
    chosen = best_per(budgeted, "target_bpw")
    items = [
        f"<b>{'fixed' if r['target_bpw'] is None else fmt(r['target_bpw']) + ' bits'}</b>: "
        f"<code>{escape(r['plan'])}</code>, {fmt(r['bpw'])} bits per weight ({fmt(r.get('bpw_model'))} over the "
        f"whole model, {fmt(r.get('bytes'))} bytes); "
        f"{_cost_line(r, o)}." + _write_it(report.exports, *quant_export_command(report, r, plan_path)[::-1])
        for r in chosen
    ]
    if len(budgeted) > len(chosen):
        items.append("Each budget shows the strategy with the lowest held-out Δnll; the table below has every plan.")
    im = report.meta.get("imatrix")
    if im and im.get("file"):
        items.append(
            f"Every GGUF type was made with llama.cpp's importance matrix <code>{escape(im['file'])}</code> "
            f"({im.get('chunks', '?')} calibration windows of {escape(', '.join(im.get('datasets') or ['?']))})."
        )
    return box("Summary", items + _files(report.exports))


def tune_best(report) -> dict | None:
    """The run with the largest held-out gain on the tuning data (the drop in NLL on windows never trained on)."""
    scored = [r for r in report.runs if (r["eval"].get("train") or {}).get("tuned")]
    return max(scored, key=lambda r: -r["eval"]["train"]["tuned"]["delta_nll"], default=None)


def tune_summary(report) -> str:
    """The tune page's opening box: the best strategy by held-out gain, what it forgot, its memory, the files."""
    best = tune_best(report)
    if best is None:
        return box("Summary", ["No strategy was evaluated on held-out windows."])
    t, s = best["eval"]["train"]["tuned"], (best["eval"].get("second") or {}).get("tuned")
    items = [
        f"Best held-out gain: <code>{escape(best['key'])}</code>, {-t['delta_nll']:+.4f} ± "
        f"{fmt(t.get('delta_nll_se'))} nats (perplexity {fmt(t.get('ref_ppl'))} → {fmt(t.get('ppl'))}) of "
        f"{len(report.runs)} strateg{'y' if len(report.runs) == 1 else 'ies'} compared."
    ]
    if s:
        items.append(
            f"Forgetting on the second corpus: {s['delta_nll']:+.4f} ± {fmt(s.get('delta_nll_se'))} nats, KL "
            f"{fmt(s.get('kl'))}."
        )
    items.append(
        f"Memory: {fmt(best.get('trainable_params_max'))} trainable parameters at most, optimizer state "
        f"{fmt(best.get('optimizer_state_bytes_max'))} bytes, peak {fmt(best.get('memory_bytes_max'))} bytes."
    )
    return box("Summary", items + _files(report.exports))


def probe_summary(result) -> str:
    """The probe page's opening box: the unit where the concept becomes readable (or that no unit is shown to), its
    scores, and why."""
    best = result.best_unit()
    row = result.unit(best or result.best["highest"])
    scores = (
        f"accuracy {fmt(row['accuracy'])} ± {fmt(row['accuracy_se'])}, control {fmt(row['control'])} ± "
        f"{fmt(row['control_se'])}, selectivity {fmt(row['selectivity'])} ± {fmt(row['selectivity_se'])}"
    )
    head = (
        f"Best unit: <code>{escape(best)}</code>: {scores}."
        if best
        else "No best unit: no unit is shown to read the concept linearly. Highest selectivity at "
        f"<code>{escape(row['unit'])}</code>: {scores}. If the concept is there, more examples shrink the "
        "standard errors; <code>layerwise steer --method probe</code> refuses this probe."
    )
    return box("Summary", [head, f"Why: {escape(result.best['why'])} (rule: {escape(result.best['rule'])})."])


def steer_summary(report) -> str:
    """The steer page's opening box: the chosen layer and strength, its effect and cost, the file to use."""
    key = report.choice["chosen_key"]
    row = next((r for r in report.rows if r["key"] == key), None)
    items = [
        f"Chosen: <code>{escape(key)}</code> (layers {escape(', '.join(report.choice['chosen']))}, "
        f"alpha {fmt(report.choice['alpha'].get('alpha'))})."
    ]
    if row is not None:
        eff = "score_shift" if "score_shift" in row else "margin_shift"
        items.append(
            f"Effect: {escape(eff.replace('_', ' '))} {fmt(row.get(eff))} ± {fmt(row.get(eff + '_se'))}; cost on "
            f"neutral text: Δnll {fmt(row.get('delta_nll'))} ± {fmt(row.get('delta_nll_se'))} nats, KL "
            f"{fmt(row.get('kl'))}."
        )
    return box(
        "Summary",
        items + (_files(report.exports) or ["File to use: <code>vector.safetensors</code> in the result folder."]),
    )
