"""`layerwise steer` on the real default model: the built-in demo end to end, and its control vector in llama.cpp."""

import ctypes
import json
import math

import pytest
import torch

from layerwise import cli

from .conftest import one_error_line

pytestmark = pytest.mark.real

PROMPT = "I watched the new movie last night, and honestly it was"


@pytest.fixture(scope="module")
def steered(tmp_path_factory, real_cache):
    out = tmp_path_factory.mktemp("steer") / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")  # an existing --out folder keeps what steer did not write
    rc = cli.main(
        [
            "steer",
            "--data",
            "builtin:sentiment",
            "--n-pairs",
            "24",
            "--seq-len",
            "64",
            "--samples",
            "1",
            "--eval-samples",
            "4",
            "--new-tokens",
            "12",
            "--export",
            "gguf",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out


def test_an_existing_out_folder_keeps_the_users_file(steered):
    assert (steered / "notes.txt").read_text() == "the user's own file"
    written = json.loads((steered / ".layerwise-files.json").read_text())
    assert "notes.txt" not in json.dumps(written) and "steer.json" in json.dumps(written)


def test_demo_moves_the_independent_score_at_a_finite_cost(steered):
    """On the fresh report prompts, at the chosen layer and strength, VADER's score of the continuations rises by more
    than its SE; pydoc NLL stays finite. The calibration prompts (alpha) come from PROMPTS, disjoint from the report
    set."""
    from layerwise.corpora.sentiment import PROMPTS, report_prompts

    doc = json.loads((steered / "steer.json").read_text())
    sets = doc["choice"]["prompts"]
    assert doc["prompts"] == sets["report"] == report_prompts(seed=0) and len(sets["report"]) == 40
    assert sorted(sets["calibration"] + sets["development"]) == sorted(PROMPTS) and len(sets["calibration"]) == 8
    assert not set(sets["report"]) & set(PROMPTS)
    assert doc["meta"]["data"]["report_prompts"] == "builtin:sentiment report_prompts(seed=0)"
    row = next(r for r in doc["rows"] if r["key"] == doc["choice"]["chosen_key"])
    assert doc["choice"]["chosen"] == doc["choice"]["ranking"][0]["units"] != ["L0"]
    assert row["score_shift"] - row["score_shift_se"] > 0, row
    assert row["margin_shift"] > 0 and row["proj_shift"] > 0
    assert math.isfinite(row["delta_nll"]) and math.isfinite(row["nll"]) and row["kl"] > 0
    assert doc["choice"]["alpha"]["reached"] and doc["choice"]["alpha"]["alpha"] == row["alpha"]
    meta = doc["meta"]
    assert meta["model_hash"] and meta["versions"]["torch"] and "steer" in meta["command"] and meta["seed"] == 0
    page = (steered / "report.html").read_text()
    assert "<img" in page and "Generations" in page
    assert cli.main(["report", str(steered), "--out", str(steered / "again.html")]) == 0
    assert doc["choice"]["chosen_key"] in (steered / "again.html").read_text()


def test_control_vector_steers_llama_cpp_like_layerwise(steered):
    """llama.cpp with the exported file predicts like layerwise steered at the same block, not like the unsteered model
    or a block off."""
    import llama_cpp

    import layerwise as lw
    from layerwise.loading import default_gguf
    from layerwise.steer import SteeringVector, read_gguf

    lm = lw.load("default")
    vec = SteeringVector.load(steered, lm)
    (unit,) = vec.units
    k = int(unit[1:])
    llm = llama_cpp.Llama(model_path=str(default_gguf()), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    toks = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(toks)
    plain_cpp = torch.tensor(llm.scores[: len(toks)]).clone()
    n_embd, data = read_gguf(steered / "control_vector.gguf", lm.anatomy.n_layers)
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, len(data), n_embd, 1, lm.anatomy.n_layers - 1) == 0
    llm.reset()
    llm.eval(toks)
    cpp = torch.tensor(llm.scores[: len(toks)]).clone()
    ids = torch.tensor([toks])

    def ours(v: SteeringVector | None) -> torch.Tensor:
        with torch.no_grad():
            if v is None:
                return lm.model(input_ids=ids, use_cache=False).logits[0]
            with v.apply(lm):
                return lm.model(input_ids=ids, use_cache=False).logits[0]

    def kl(p: torch.Tensor, q: torch.Tensor) -> float:  # mean over positions of KL(p || q)
        lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    want = ours(vec)
    off = {
        j: ours(
            SteeringVector({f"L{j}": vec.directions[unit]}, {f"L{j}": vec.scales[unit]}, vec.alpha, model=vec.model)
        )
        for j in (k - 1, k + 1)
    }
    here = kl(cpp, want)
    assert float(plain_cpp.abs().max()) > 0  # scores are real (logits_all), not zeros
    assert (cpp.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert here < 0.05, here
    assert kl(cpp, plain_cpp) > 5 * here  # steering moved llama.cpp clearly: the match is not vacuous
    assert all(kl(cpp, o) > 2 * here for o in off.values()), (here, {j: kl(cpp, o) for j, o in off.items()})


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--alpha", "nan"], "finite"),
        (["--layers", "L30"], "does not exist"),
        (["--data", "builtin:sentiment", "--layers", "L0", "--export", "gguf"], "cannot steer L0"),
        (["--pos", "POS", "--neg", "NEG"], "same count"),
        (["--pos", "EMPTY", "--neg", "EMPTY"], "at least 2"),
    ],
)
def test_steer_bad_input_is_one_line(argv, match, tmp_path, capsys, real_cache):
    (tmp_path / "pos.txt").write_text("I love it.\nWhat a delight.\n")
    (tmp_path / "neg.txt").write_text("I hate it.\n")
    (tmp_path / "empty.txt").write_text("\n")
    files = {"POS": "pos.txt", "NEG": "neg.txt", "EMPTY": "empty.txt"}
    argv = [str(tmp_path / files[a]) if a in files else a for a in argv]
    if "--data" not in argv and "--pos" not in argv:
        argv = ["--data", "builtin:sentiment", *argv]
    rc = cli.main(
        [
            "steer",
            *argv,
            "--n-pairs",
            "4",
            "--seq-len",
            "32",
            "--samples",
            "1",
            "--eval-samples",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and one_error_line(err) and match in err, err
    assert not (tmp_path / "out").exists()


def test_the_vector_measures_the_same_from_disk(steered):
    """The demo's vector on the default model read block by block from disk: the log-prob margins, the greedy
    steered continuations and the cost on neutral windows are the in-memory model's."""
    from layerwise import load, windows
    from layerwise.corpora.sentiment import report_prompts
    from layerwise.features import tokenize
    from layerwise.steer import SteeringVector, generate, margins
    from layerwise.steer.measuring import _cost

    lm, disk = load("default"), load("default", offload="disk")
    vec = SteeringVector.load(steered)
    prompts = tokenize(lm, report_prompts(seed=0)[:4])[0]
    conts = [tuple(lm.tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in ("great", "terrible"))]
    ids = windows("builtin:pydoc", lm.tokenizer, seq_len=64, samples=2).calibration
    found = []
    for m in (lm, disk):
        with vec.apply(m):
            found.append((margins(m, prompts, conts), generate(m, prompts, 8)))
        found.append(_cost(m, {"v": (vec, vec.alpha)}, ids, 2, False)["v"])
    (ma, ta), ca, (mb, tb), cb = found
    torch.testing.assert_close(mb, ma, rtol=1e-4, atol=1e-4)
    assert tb == ta and all(ta), ta
    for key in ("delta_nll", "kl", "same_top_p"):
        assert math.isclose(ca[key], cb[key], rel_tol=1e-4, abs_tol=1e-5), (key, ca[key], cb[key])
