"""``layerwise tune`` with data parallelism: two CPU processes (gloo) started by ``accelerate launch``, against one
process with their global batch, for every selection strategy; the API's and the CLI's outputs written once.

Run as a module (``accelerate launch ... -m tests.test_tune_ddp DIR``) this file is the worker each of the two
processes runs; one launch serves every test here (starting processes that import torch is most of the cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from layerwise import tune
from layerwise.data import Windows
from layerwise.errors import LayerwiseError

from .conftest import tiny_folder, tiny_lm, tiny_windows

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 4
PER_PROCESS = 2  # examples per process and step; the one-process reference takes both processes' 4
DATA = tiny_windows(8, 12)  # two global batches a pass
WEIGHTS = {f"L{i}": float(i + 1) for i in range(LAYERS)}  # importance grows with depth
COMMON = dict(active=2, interval=1, steps=3, lr=1e-2, progress=False)
CASES: dict[str, dict] = {
    "full": dict(select="full"),
    "lisa": dict(select="lisa"),
    "importance": dict(select="importance:ablate_nll", weights=WEIGHTS),
    "top": dict(select="top:ablate_nll", weights=WEIGHTS),
    "adaptive": dict(select="adaptive"),
    "badam:ascending": dict(select="badam:ascending"),
    "badam:descending": dict(select="badam:descending"),
    "badam:random": dict(select="badam:random"),
    "lora": dict(select="lora"),
    "adaptive over lora (IST)": dict(select="adaptive", lora=True),
    "lisa over mlp, embeddings frozen, 2 micro-batches": dict(
        select="lisa", unit="mlp", train_embeddings=False, grad_accum=2
    ),
    "lisa over experts (OLMoE: each expert's slices parameters of their own)": dict(
        select="lisa", unit="expert", arch="olmoe"
    ),
}
FIXED = ("full", "top", "lora")  # the cases whose trained set never changes
CLI = ["tune", "--samples", "4", "--seq-len", "16", "--batch-size", "1", "--eval-samples", "2", "--select", "lisa"]
CLI += ["--active", "2", "--interval", "1", "--steps", "2", "--lr", "1e-2", "--device", "cpu"]


class _Watch(tune.LayerSelector):
    """The selector, noting after each optimizer step which parameters moved inside and outside the units it
    trained, whether the optimizer holds state outside them, and a digest of every weight."""

    def on_step_begin(self, args, state, control, **kw):
        super().on_step_begin(args, state, control, **kw)
        self._before = {n: p.detach().clone() for n, p in self._model.named_parameters()}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        super().on_optimizer_step(args, state, control, optimizer=optimizer, **kw)
        live = {id(p) for u in self.current for p in self.params[u]} | {id(p) for p in self.always}
        named = list(self._model.named_parameters())
        moved = {n for n, p in named if not torch.equal(p, self._before[n])}
        weights = b"".join(p.detach().numpy().tobytes() for _, p in named)
        self.records[-1] |= {
            "moved_outside": sorted(n for n, p in named if n in moved and id(p) not in live),
            "moved_inside": len([n for n, p in named if n in moved and id(p) in live]),
            "state_outside": any(id(p) not in live for p in optimizer.state),
            "digest": hashlib.sha256(weights).hexdigest(),
        }


def _train(batch_size: int, arch: str = "llama", **settings) -> dict:
    """One strategy from the same tiny model, in float64 (see the tolerance below)."""
    lm = tiny_lm(arch, LAYERS)
    if lm.anatomy.moe_layers:
        lm.model.set_experts_implementation("eager")  # torch's grouped matmul takes no float64
    lm.model.double()
    run = tune.train(lm, DATA, batch_size=batch_size, **COMMON, **settings)
    params = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    return {"params": params, "losses": run.losses, "records": run.records}


def _worker(out: Path) -> None:
    """Every case with the watching selector; a whole ``tune.run`` told to write into a folder of this process's
    own (only the first process may write there); the CLI, into one folder for both."""
    from layerwise.cli import main
    from layerwise.tune import loop

    loop.LayerSelector = _Watch
    results = {key: _train(PER_PROCESS, **settings) for key, settings in CASES.items()}
    loop.LayerSelector = tune.LayerSelector
    rank = torch.distributed.get_rank()
    torch.save(results, out / f"rank{rank}.pt")
    data = tune.TuneData.from_windows(Windows(tiny_windows(10, 12).ids, 8, "random", "x", 96), eval_samples=2)
    tune.run(
        tiny_lm("llama", LAYERS),
        data,
        select=["lisa"],
        batch_size=PER_PROCESS,
        save_every=1,
        out=out / f"api{rank}",
        **COMMON,
    )
    paths = ["--model", str(out / "tiny"), "--data", str(out / "notes.txt"), "--out", str(out / "cli")]
    paths += ["--second-data", str(out / "second.txt")]  # tokenizing builtin:fortunes would take longer than the rest
    if main([*CLI, *paths]) != 0:
        raise SystemExit(f"the CLI failed in process {rank}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The folder where the two processes of one ``accelerate launch`` (as the README says, ``--multi_gpu`` even on
    CPUs: it starts them with torchrun; tune joins them with gloo) left their results; their stdout in it too."""
    out = tmp_path_factory.mktemp("ddp")
    tiny_folder(out / "tiny")
    (out / "notes.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (out / "second.txt").write_text("Pack my box with five dozen liquor jugs. " * 40)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), "-m", "tests.test_tune_ddp", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf")}  # no user config
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # a stall fails
    assert done.returncode == 0, done.stderr[-4000:]
    (out / "stdout.txt").write_text(done.stdout)
    return out


def test_two_processes_match_one_process_with_their_global_batch(launched):
    """Per strategy: (a) both processes hold bit-identical weights after every step; (b) they equal one process
    trained on the global batch (2 × 2 examples), with the same schedule; (c) nothing outside the trained units
    moves or keeps Adam state in any step, while the trained set does change (but for full, top, lora).

    (b)'s tolerance: HF's loss is a mean over the batch's tokens and every window has as many, so the mean of the two
    processes' losses is the global batch's and DDP's averaged gradient is its gradient, up to the order of float
    sums. In float32 that order alone flips the sign of the few gradient elements within rounding of zero, and
    Adam's first step moves those by ±lr whatever their size (measured: 2 of 1024 elements 1.7e-2 apart), so the
    comparison runs in float64, where the runs agree to 4e-14; 1e-10 is a hundred-millionth of lr. HF computes the
    loss itself in float32 (it casts the logits), hence 1e-5 for the losses.
    """
    first, second = (torch.load(launched / f"rank{r}.pt") for r in (0, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small train faster on one thread, much faster on a busy machine
    try:
        reference = {key: _train(2 * PER_PROCESS, **settings) for key, settings in CASES.items()}
    finally:
        torch.set_num_threads(threads)
    for key, one in reference.items():
        a, b = first[key], second[key]
        assert [r["digest"] for r in a["records"]] == [r["digest"] for r in b["records"]], key
        assert all(torch.equal(p, b["params"][n]) for n, p in a["params"].items()), key
        active = [r["active"] for r in a["records"]]
        assert active == [r["active"] for r in b["records"]] == [r["active"] for r in one["records"]], key
        assert (len({tuple(u) for u in active}) == 1) == (key in FIXED), key
        for r in a["records"]:
            assert r["moved_outside"] == [] and not r["state_outside"] and r["moved_inside"] > 0, (key, r)
        for n, p in one["params"].items():
            assert torch.allclose(a["params"][n], p, rtol=0, atol=1e-10), (key, n)
        assert max(abs(x - y) for x, y in zip(a["losses"], one["losses"])) < 1e-5, key


def test_only_the_first_process_writes(launched):
    """(d) The API given a folder per process: the first has the result and the checkpoint, the second nothing. The
    CLI given one folder: one result, one line of output, no half-written leftovers."""
    assert (launched / "api0" / "tune.json").is_file() and (launched / "api0" / "model" / "config.json").is_file()
    assert not (launched / "api1").exists()
    assert json.loads((launched / "api0" / "tune.json").read_text())["meta"]["processes"] == 2
    assert (launched / "stdout.txt").read_text().count("wrote ") == 1
    report = json.loads((launched / "cli" / "tune.json").read_text())
    assert report["meta"]["processes"] == 2 and report["exports"]["model"]["kind"] == "hf"
    assert len(report["runs"][0]["loss"]) == 2 and (launched / "cli" / "report.html").is_file()
    assert not [f for d in ("api0", "cli") for f in (launched / d).rglob("*.part")]


@pytest.mark.parametrize(
    ("kind", "precision", "message"),
    [
        (DistributedType.FSDP, "no", "not FSDP: FSDP and DeepSpeed shard"),
        (DistributedType.DEEPSPEED, "no", "not DEEPSPEED"),
        (DistributedType.MULTI_CPU, "bf16", "launch without --mixed_precision bf16"),
    ],
)
def test_fsdp_deepspeed_and_mixed_precision_are_refused_in_one_line(monkeypatch, kind, precision, message):
    """What was not verified is refused (a stand-in accelerator: on CPUs accelerate refuses FSDP itself, and
    DeepSpeed is not installed here)."""
    from layerwise.tune import parallel

    stand_in = SimpleNamespace(distributed_type=kind, mixed_precision=precision)
    monkeypatch.setattr(parallel, "Accelerator", lambda **kw: stand_in)
    with pytest.raises(LayerwiseError, match=message) as e:
        parallel.accelerator(torch.device("cpu"))
    assert "\n" not in str(e.value)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
