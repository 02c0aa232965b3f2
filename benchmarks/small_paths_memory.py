"""Peak memory of the small paths on a Gemma-3-270M-shaped model (262k vocabulary), before and after slicing them.

`layerwise probe` on such a model peaked near 8 GB on its first run. Each path runs
here in a fresh process, once with the code before this work (``BASELINE``, taken
with ``git archive``) and once with the working tree, and reports that process's
peak resident set (VmHWM, memory-mapped weights included) and its seconds:

  first_load   convert the GGUF file into a fresh cache, then load it (a first run)
  load         load the converted checkpoint: the floor every other path stands on
  profile      + `profile(ablation="taylor", lens=False)` on 8 x 128 builtin:pydoc
               windows, batch 8: probe's importance curve
  features     + probe's feature collection: 400 builtin:cities examples, batch 8
  evaluate     + drop's (and steer's, tune's, quantize's) evaluation: `quality` of
               the model without L5 against the model, 8 x 256 windows, batch 4
  probe_first_run  (only when asked for) `layerwise probe --model FILE.gguf --examples 400`
               with a fresh cache: all of the above in one process, as the issue saw it

The model has random weights and a vocabulary of pydoc's most frequent character
n-grams; its GGUF file stores matrices in Q8_0, as Gemma-3-270M's usually do.

Usage: python benchmarks/small_paths_memory.py [--paths first_load,profile,...] [--name small_paths_memory]
Writes benchmarks/results/NAME.md and NAME.json (the default paths: about 15 minutes on 2 shared cores;
`--paths probe_first_run --name small_paths_memory_probe`: about 7).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
#: The commit before the small paths were sliced: the "before" column.
BASELINE = "b3aee98"
VOCAB = 262144

#: What each path's process does after importing layerwise; ``{gguf}``, ``{model}`` and ``{cache}`` are filled in.
WORK = {
    "first_load": "lw.load({gguf!r}, device='cpu')",
    "load": "lw.load({model!r}, device='cpu')",
    "profile": """
        lm = lw.load({model!r}, device='cpu')
        w = lw.windows('builtin:pydoc', lm.tokenizer, seq_len=128, samples=8)
        lw.profile(lm, w, ablation='taylor', lens=False, batch_size=8, progress=False)""",
    "features": """
        from layerwise.features import collect
        from layerwise.probe import read_examples
        lm = lw.load({model!r}, device='cpu')
        collect(lm, read_examples('builtin:cities', n=400, seed=0).texts, units='blocks', batch_size=8)""",
    "evaluate": """
        from layerwise.evaluate import next_token_logits, quality
        from layerwise.trace import skip
        lm = lw.load({model!r}, device='cpu')
        w = lw.windows('builtin:pydoc', lm.tokenizer, seq_len=256, samples=8)
        drop = next_token_logits(lm.model, lambda: skip(lm.anatomy, ['L5']))
        quality(next_token_logits(lm.model), {{'no L5': drop}}, w.ids[:8], batch_size=4)""",
    "probe_first_run": """
        from layerwise import cli
        cli.main(['probe', '--model', {gguf!r}, '--examples', '400', '--out', {cache!r} + '/probe', '--json'])""",
}
DEFAULT_PATHS = ("first_load", "load", "profile", "features", "evaluate")


def vocabulary() -> list[str]:
    """262144 tokens: specials, byte tokens, then pydoc's most frequent character n-grams (words marked with ▁)."""
    from pydoc_data.topics import topics

    words = collections.Counter("\u2581" + w for w in re.findall(r"\S+", "\n".join(topics[k] for k in sorted(topics))))
    grams: collections.Counter = collections.Counter()
    for word, count in words.items():
        for n in range(1, min(len(word), 16) + 1):
            for i in range(len(word) - n + 1):
                grams[word[i : i + n]] += count
    tokens = ["<unk>", "<bos>", "<eos>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [g for g, _ in sorted(grams.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))][: VOCAB - len(tokens)]
    return tokens + [f"<unused{i}>" for i in range(VOCAB - len(tokens))]


def gemma_shaped_gguf(path: Path) -> Path:
    """Gemma-3-270M's shape (hidden 640, 18 layers of 4 query heads and 1 key-value head of 256, MLP 2048, vocabulary
    262144, a 512-token sliding window on five layers in six), transformers' Gemma3TextConfig defaults otherwise;
    random weights, Q8_0 matrices."""
    import transformers as tf

    sys.path.insert(0, str(REPO))
    from tests.conftest import write_gguf

    cfg = tf.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        max_position_embeddings=32768,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    )
    torch.manual_seed(0)
    return write_gguf(tf.Gemma3ForCausalLM(cfg).eval(), path, vocabulary())


#: The child's last line: its peak resident set as layerwise.memory reads it on Linux (VmHWM: ru_maxrss would count
#: this driver's memory too, folded in when the child execs), its seconds, and its CPU seconds (user and system, all
#: threads), which other jobs on the machine disturb far less than the seconds.
REPORT = (
    "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "use = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(json.dumps({'peak_rss_bytes': hwm * 1024, 'seconds': time.perf_counter() - t, "
    "'cpu_seconds': use.ru_utime + use.ru_stime}))"
)


def _python(code: str, src: Path, cache: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter with ``src`` first on the path; its standard output."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env |= {"LAYERWISE_CACHE": str(cache)} if cache else {}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"with {src}:\n{code}\nfailed:\n{done.stderr[-3000:]}")
    return done.stdout


def run(path: str, src: Path, cache: Path, gguf: Path, model: Path) -> dict:
    """One path in a fresh process: its peak resident set and seconds."""
    work = textwrap.dedent(WORK[path].format(gguf=str(gguf), model=str(model), cache=str(cache))).strip()
    out = _python(
        "\n".join(["import json, resource, time", "t = time.perf_counter()", "import layerwise as lw", work, REPORT]),
        src,
        cache,
    )
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"comma-separated, from {', '.join(WORK)}")
    ap.add_argument("--name", default="small_paths_memory", help="the results' file name, without suffix")
    args = ap.parse_args()
    paths = args.paths.split(",")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        subprocess.run(f"git -C {REPO} archive {BASELINE} src | tar -x -C {tmp}", shell=True, check=True)
        gguf = tmp_path / "gemma3-270m-shaped.Q8_0.gguf"  # built in a child, so that this driver stays small
        _python(
            f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import small_paths_memory as b; "
            f"b.gemma_shaped_gguf(b.Path({str(gguf)!r}))",
            REPO / "src",
        )
        first = run("first_load", REPO / "src", tmp_path / "cache", gguf, gguf)  # converts what every other path loads
        (model,) = (tmp_path / "cache" / "models").iterdir()
        rows: dict[str, dict] = {"after": {}, "before": {}}
        for path in paths:  # a path's two versions back to back, so that other jobs on the machine slow both alike
            for version, src in (("after", REPO / "src"), ("before", tmp_path / "src")):
                fresh = version == "before" or path != "first_load"
                rows[version][path] = (
                    run(path, src, tmp_path / f"cache-{version}-{path}", gguf, model) if fresh else first
                )
                print(version, path, rows[version][path], flush=True)
        size = gguf.stat().st_size
    out = {
        "date": date.today().isoformat(),
        "machine": _machine(),
        "baseline": BASELINE,
        "gguf_bytes": size,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "rows": rows,
    }
    _write(out, paths, args.name)


def _machine() -> dict:
    import transformers

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def load_average(out: dict) -> str:
    """The machine's load average (1, 5, 15 min) at the run's start and end, as the pages state it."""
    start, end = (", ".join(f"{v:.1f}" for v in out[k]) for k in ("loadavg_start", "loadavg_end"))
    return f"Load average (1, 5, 15 min) at start {start}, at end {end}"


def publish(name: str, out: dict, lines: list[str], *, show: bool = True) -> None:
    """Write a benchmark's results, ``name``.json (``out``) and ``name``.md (``lines``), atomically; print the page."""
    from layerwise.io import write_atomic, write_json

    write_json(RESULTS / f"{name}.json", out)
    write_atomic(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))


def heading(name: str, out: dict) -> str:
    """A results page's first line: the benchmark, the date and the machine."""
    m = out["machine"]
    return (
        f"# {name} — {out['date']} — {m['cpus']} cpus, {m['ram_gib']} GiB, torch {m['torch']}, "
        f"transformers {m['transformers']}"
    )


def _write(out: dict, paths: list[str], name: str) -> None:

    rows = out["rows"]
    lines = [
        heading("small_paths_memory", out),
        "",
        "Gemma-3-270M-shaped model (hidden 640, 18 layers, 262144-token vocabulary, random weights, Q8_0 GGUF), CPU. "
        f"Each row is one fresh process; before = commit {out['baseline']}, after = this tree. "
        f"Generated by `benchmarks/small_paths_memory.py --paths {','.join(paths)} --name {name}`.",
        "",
        "| path | peak before (MiB) | peak after (MiB) | before / after | CPU s before | CPU s after | s before | "
        "s after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        b, a = rows["before"][path], rows["after"][path]
        lines.append(
            f"| {path} | {b['peak_rss_bytes'] / 2**20:.0f} | {a['peak_rss_bytes'] / 2**20:.0f} | "
            f"{b['peak_rss_bytes'] / a['peak_rss_bytes']:.2f}x | {b['cpu_seconds']:.0f} | {a['cpu_seconds']:.0f} | "
            f"{b['seconds']:.0f} | {a['seconds']:.0f} |"
        )
    if "load" in paths:
        lines += [
            "",
            "Every path after first_load loads the converted checkpoint first. The `load` row is the interpreter, the "
            "libraries and the tokenizer: the 1.07 GB of float32 weights are memory-mapped and count once a "
            "forward pass touches them, so a path that runs the model stands on about the `features` row.",
        ]
    lines += [
        "",
        f"{load_average(out)}: where it is above {out['machine']['cpus']}, other "
        "jobs shared the cores, and the seconds (wall clock) are slower and noisy; "
        "CPU seconds (user and system, all threads) less so, and the peaks not at all.",
    ]
    publish(name, out, lines)


if __name__ == "__main__":
    main()
