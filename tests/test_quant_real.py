"""`layerwise quantize` end to end on the real default model: GGUF types made and read back by llama.cpp."""

import json
import math

import pytest

from layerwise import cli
from layerwise.quant.gguf import IQ_TYPES, TYPES

from .conftest import gguf_tensors, one_error_line, recipe_reproduces, same_checkpoint

pytestmark = pytest.mark.real

BITS = 4.6


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_cache):
    out = tmp_path_factory.mktemp("quant") / "run"
    # 256-token windows: on 64-token ones llama.cpp's own kernels already put the unquantized model 1.5% off
    # ours (0.5% at 256), which leaves the 2% check no room for the plan itself.
    rc = cli.main(
        [
            "quantize",
            "--bits",
            str(BITS),
            "--strategy",
            "measured",
            "--seq-len",
            "256",
            "--samples",
            "2",
            "--eval-samples",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out


def test_plan_hits_the_budget_and_says_what_was_stored(run):
    plan = json.loads((run / "plan.json").read_text())["plans"]
    (p,) = plan.values()
    assert abs(p["bpw"] - BITS) <= 0.02 and p["bpw"] <= BITS + 1e-9
    assert len(p["groups"]) == 30 * 7
    stored = {s for g in p["groups"].values() for s in g["stored"]}
    assert len({g["config"] for g in p["groups"].values()}) > 1 and stored <= set(TYPES + IQ_TYPES)
    ev = json.loads((run / "eval.json").read_text())
    (row,) = ev["rows"]
    assert all(math.isfinite(row[k]) for k in ("ppl", "kl", "delta_nll", "predicted_delta_nll", "bpw_model"))
    assert row["kl"] >= 0
    # the reported size is the size of the tensors in the file written (embeddings and norms as stored)
    tensors = gguf_tensors(run / "model.gguf").values()
    assert row["bytes"] == sum(int(t.n_bytes) for t in tensors)
    assert row["bpw_model"] == pytest.approx(8 * row["bytes"] / sum(int(t.n_elements) for t in tensors), rel=1e-12)
    assert "measured@4.6" in (run / "report.html").read_text()
    assert (ev["meta"]["seed"], ev["meta"]["batch_size"]) == (0, 4) and "--bits" in ev["meta"]["command"]


def test_saved_plan_applies_and_exports_again_without_measuring(run, tmp_path, capsys):
    """QuantPlan.load(...).apply(lm) on a freshly loaded model gives the run's held-out perplexity; --plan writes the
    same GGUF file and recipe; a plan for other weights is refused in one line."""
    from layerwise import load, windows
    from layerwise.evaluate import next_token_logits, quality
    from layerwise.quantize import GGUFType, QuantPlan

    plan = QuantPlan.load(run / "plan.json")
    assert len(plan.configs) == 210 and all(isinstance(c, GGUFType) for c in plan.configs.values())
    lm = load("default")
    ids = windows("builtin:pydoc", lm.tokenizer, seq_len=256, samples=2).evaluation[:3]
    q = quality(next_token_logits(lm.model), {"p": next_token_logits(lm.model, lambda: plan.apply(lm))}, ids)
    assert q["p"]["ppl"] == pytest.approx(json.loads((run / "eval.json").read_text())["rows"][0]["ppl"], rel=1e-6)
    again = tmp_path / "again"
    assert (
        cli.main(
            [
                "quantize",
                "--plan",
                str(run / "plan.json"),
                "--seq-len",
                "256",
                "--samples",
                "2",
                "--eval-samples",
                "1",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    ours, theirs = gguf_tensors(run / "model.gguf"), gguf_tensors(again / "model.gguf")
    assert ours.keys() == theirs.keys() and all(bytes(theirs[k].data) == bytes(t.data) for k, t in ours.items())
    assert (again / "recipe.sh").read_text() == (run / "recipe.sh").read_text()
    other = json.loads((run / "plan.json").read_text())
    other["meta"]["model_hash"] = "another-model"
    (tmp_path / "other.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert (
        cli.main(
            [
                "quantize",
                "--plan",
                str(tmp_path / "other.json"),
                "--seq-len",
                "32",
                "--samples",
                "1",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert one_error_line(err) and "made for another model" in err, err


def test_report_is_rerendered_from_the_saved_result(run, tmp_path):
    page = tmp_path / "again.html"
    assert cli.main(["report", str(run), "--out", str(page)]) == 0
    assert "measured@4.6" in page.read_text() and "Bits by block" in page.read_text()


def test_gguf_export_holds_the_plan_and_runs_in_llama_cpp(run):
    """The file's tensor types are the plan's stored types; llama.cpp's perplexity is within 2% of ours."""
    plan = next(iter(json.loads((run / "plan.json").read_text())["plans"].values()))
    ev = json.loads((run / "eval.json").read_text())
    tensors = gguf_tensors(run / "model.gguf")
    from layerwise import load

    an = load("default").anatomy
    for g in plan["groups"].values():
        for path, stored in zip(g["modules"], g["stored"]):
            assert tensors[an.gguf_name(path)].tensor_type.name == stored
    assert ev["exports"]["gguf"]["bytes"] == (run / "model.gguf").stat().st_size
    ours, theirs = ev["rows"][0]["ppl"], ev["exports"]["gguf"]["llama_cpp_ppl"]
    assert abs(theirs / ours - 1) < 0.02, (ours, theirs)


def test_recipe_makes_the_same_file_with_llama_quantize(run, tmp_path):
    """The recipe's --tensor-type lines and its importance matrix (the run's imatrix.gguf, named from the folder the
    recipe runs in), given to llama.cpp's quantizer, reproduce the export byte for byte."""
    assert recipe_reproduces(run, tmp_path) == 210


def test_imatrix_is_made_on_the_calibration_windows_and_weighs_llama_cpps_rounding(run, tmp_path):
    """The run made llama.cpp's importance matrix on its calibration windows and kept it beside the plan (llama.cpp's
    reader reads it); the types it chose from were quantized with it, and a tensor quantized with it differs from
    the same tensor without it."""
    from layerwise import load
    from layerwise.quant.gguf import llama_quantize, source_gguf
    from layerwise.quant.imatrix import Imatrix

    from .test_imatrix import _llama_cpp_reads

    meta = json.loads((run / "eval.json").read_text())["meta"]
    im = Imatrix.load(run / "imatrix.gguf")
    assert meta["imatrix"]["digest"] == im.digest and im.meta["data"] == meta["data"]
    assert im.chunk_count == 2 and im.chunk_size == 256 and len(im.sums) == 210
    seen = _llama_cpp_reads(run / "imatrix.gguf")
    assert seen["type"] == "imatrix" and len(seen["tensors"]) == 420
    plan = json.loads((run / "plan.json").read_text())
    assert plan["meta"]["imatrix"]["file"] == "imatrix.gguf"
    src = source_gguf(load("default"))
    plain, weighed = (
        llama_quantize(src, tmp_path / f"{k}.gguf", "Q4_0", imatrix=i) for k, i in (("a", None), ("b", im))
    )
    a, b = gguf_tensors(plain), gguf_tensors(weighed)
    assert bytes(a["token_embd.weight"].data) == bytes(b["token_embd.weight"].data)  # no entry: no weighing
    assert bytes(a["blk.0.attn_q.weight"].data) != bytes(b["blk.0.attn_q.weight"].data)


def test_iq_types_join_with_the_imatrix_and_fallbacks_are_measured_once(run):
    """With the importance matrix the IQ types are candidates too. In rows of 576 (not a multiple of 256) llama.cpp
    stores every IQ type as IQ4_NL (and Q4_K as Q5_0): the measurement records what was stored, measures each stored
    tensor once and gives its twins the same record, which equals IQ4_NL measured alone. In ffn_down's rows of 1536
    each IQ type is stored as asked and measured: fewer bits, more error."""
    from layerwise import load, windows
    from layerwise.quant.gguf import GGUFCandidates
    from layerwise.quant.imatrix import Imatrix
    from layerwise.quant.measure import measure

    meas = json.loads((run / "measurement.json").read_text())
    assert meas["meta"]["candidates"][:3] == ["IQ1_S", "IQ1_M", "IQ2_XXS"] and set(IQ_TYPES + TYPES) == set(
        meas["meta"]["candidates"]
    )
    q = meas["groups"]["L3.attn.q_proj"]["configs"]
    assert {q[t]["stored"][0] for t in IQ_TYPES} == {"IQ4_NL"} and all(q[t] == q["IQ4_NL"] for t in IQ_TYPES)
    assert q["Q4_K"] == q["Q5_0"] and q["Q4_K"]["stored"] == ["Q5_0"] and q["Q4_K"] != q["Q4_1"]
    down = meas["groups"]["L3.mlp.down_proj"]["configs"]
    assert [down[t]["stored"] for t in IQ_TYPES] == [[t] for t in IQ_TYPES]
    ladder = ("IQ1_S", "IQ2_XXS", "IQ3_XXS", "IQ4_XS")
    assert [down[t]["bits"] for t in ladder] == sorted(down[t]["bits"] for t in ladder)
    assert [down[t]["err"] for t in ladder] == sorted((down[t]["err"] for t in ladder), reverse=True)
    lm = load("default")
    w = windows("builtin:pydoc", lm.tokenizer, seq_len=256, samples=2)
    alone = measure(lm, w, candidates=GGUFCandidates.of(lm, ("IQ4_NL",), Imatrix.load(run / "imatrix.gguf")))
    for g, entry in alone.groups.items():
        assert entry["configs"]["IQ4_NL"]["err"] == pytest.approx(meas["groups"][g]["configs"]["IQ4_NL"]["err"], 1e-6)


def test_size_target_is_the_gguf_files_size(run, tmp_path):
    """--size plans the file's size, metadata and every tensor included: the GGUF file written is at most that and
    within 1% of it. The fixture's measurement and importance matrix are reused (nothing is measured again)."""
    import shutil

    out = tmp_path / "sized"
    out.mkdir()
    for name in ("measurement.json", "imatrix.gguf"):
        shutil.copy(run / name, out / name)
    size = (run / "model.gguf").stat().st_size - 3 * 2**20
    argv = ["--size", str(size), "--seq-len", "256", "--samples", "2", "--eval-samples", "3", "--export", "gguf"]
    assert cli.main(["quantize", *argv, "--out", str(out)]) == 0
    written = (out / "model.gguf").stat().st_size
    assert 0.99 * size <= written <= size, (written, size)
    (row,) = json.loads((out / "eval.json").read_text())["rows"]
    assert row["target_bpw"] < BITS and row["plan"].startswith("measured@")


def test_embedding_type_is_counted_written_and_evaluated(run, tmp_path):
    """--embedding Q4_K: the file's token embedding is what llama.cpp stores for Q4_K in rows of 576 (Q5_0, the same
    bytes as its quantizer's --token-embedding-type), the size target counts it, the recipe makes the same file,
    the plan keeps it, and the held-out evaluation runs the model with it (the tied head too): llama.cpp's
    perplexity of the file agrees with ours."""
    import shutil

    from layerwise.quantize import QuantPlan

    out = tmp_path / "emb"
    out.mkdir()
    for name in ("measurement.json", "imatrix.gguf"):
        shutil.copy(run / name, out / name)
    size = (run / "model.gguf").stat().st_size - 8 * 2**20  # Q5_0 takes 10.1 MiB off the Q8_0 embedding
    argv = ["--size", str(size), "--embedding", "q4_k", "--seq-len", "256", "--samples", "2", "--eval-samples", "3"]
    assert cli.main(["quantize", *argv, "--out", str(out)]) == 0
    written = (out / "model.gguf").stat().st_size
    assert 0.99 * size <= written <= size, (written, size)
    tensors = gguf_tensors(out / "model.gguf")
    assert tensors["token_embd.weight"].tensor_type.name == "Q5_0"
    ev = json.loads((out / "eval.json").read_text())
    (row,) = ev["rows"]
    assert ev["meta"]["embedding"] == {"type": "Q4_K", "stored": "Q5_0"} and row["target_bpw"] > BITS
    assert row["bytes"] == sum(int(t.n_bytes) for t in tensors.values())
    assert abs(ev["exports"]["gguf"]["llama_cpp_ppl"] / row["ppl"] - 1) < 0.02, (row, ev["exports"])
    assert QuantPlan.load(out).embedding == "Q4_K"
    assert recipe_reproduces(out, tmp_path) == 210
    # read from disk one block at a time, the plan's stream starts from its own embedding and its tied head
    disk = tmp_path / "emb-disk"
    disk.mkdir()
    for name in ("measurement.json", "imatrix.gguf"):
        shutil.copy(run / name, disk / name)
    assert cli.main(["quantize", *argv, "--offload", "disk", "--export", "none", "--out", str(disk)]) == 0
    (got,) = json.loads((disk / "eval.json").read_text())["rows"]
    assert got["plan"] == row["plan"] and got["bytes"] == row["bytes"]
    assert {k: got[k] for k in ("ppl", "kl")} == pytest.approx({k: row[k] for k in ("ppl", "kl")}, rel=1e-5)


def test_tie_gives_gate_and_up_one_type(run, tmp_path):
    """--tie gate,up: each block's ffn_gate and ffn_up get one type, in the plan and in the GGUF file written (the
    imatrix reused from the fixture's run: the same windows)."""
    import shutil

    out = tmp_path / "tied"
    out.mkdir()
    shutil.copy(run / "imatrix.gguf", out / "imatrix.gguf")
    argv = ["--bits", str(BITS), "--tie", "gate,up", "--seq-len", "256", "--samples", "2", "--eval-samples", "3"]
    assert cli.main(["quantize", *argv, "--export", "gguf", "--out", str(out)]) == 0
    (plan,) = json.loads((out / "plan.json").read_text())["plans"].values()
    assert len(plan["groups"]) == 30 * 6 and abs(plan["bpw"] - BITS) <= 0.02
    types = gguf_tensors(out / "model.gguf")
    for i in range(30):
        assert types[f"blk.{i}.ffn_gate.weight"].tensor_type == types[f"blk.{i}.ffn_up.weight"].tensor_type, i
        assert f"L{i}.mlp.gate_up" in plan["groups"]


def test_hf_export_generates_the_fake_quantized_models_tokens(real_cache, tmp_path):
    """compressed-tensors checkpoint of a mixed-bit GPTQ plan: plain transformers loads it and decodes as layerwise
    does. The plan ranks groups at random: the measured strategy's choice among GPTQ plans (each made twice, cross-
    fitted) is checked on tiny models, and cost 12 of this test's 14 minutes on 2 cores."""
    import torch
    from transformers import AutoModelForCausalLM

    from layerwise import load, windows
    from layerwise.quantize import QuantPlan

    out = tmp_path / "ct"
    argv = [
        "--format",
        "int",
        "--method",
        "gptq",
        "--group-size",
        "64",
        "--bits",
        "5",
        "--strategy",
        "ranked:random",
        "--seq-len",
        "64",
        "--samples",
        "2",
        "--eval-samples",
        "3",
    ]
    assert cli.main(["quantize", *argv, "--out", str(out)]) == 0
    plan = next(iter(json.loads((out / "plan.json").read_text())["plans"].values()))
    bits = {g["config"] for g in plan["groups"].values()}
    assert len(bits) > 1 and all(c.startswith("s") and c.endswith("g64") for c in bits)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["exports"]["hf"]["transformers_ppl"] == pytest.approx(ev["rows"][0]["ppl"], rel=1e-4)
    lm = load("default")  # the saved GPTQ plan, applied to a freshly loaded model with its calibration windows
    saved = QuantPlan.load(out / "plan.json")
    theirs = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    prompt = lm.tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        got = theirs.generate(prompt, max_new_tokens=24, do_sample=False)
        with saved.apply(lm, windows("builtin:pydoc", lm.tokenizer, seq_len=64, samples=2)):
            want = lm.model.generate(prompt, max_new_tokens=24, do_sample=False)
            for path in saved.configs:
                assert torch.equal(theirs.get_submodule(path).weight, lm.model.get_submodule(path).weight), path
    assert got.tolist() == want.tolist()
    files = list((out / "model").glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) == ev["exports"]["hf"]["bytes"]
    # the row's size is the tensors in that file (each file: 8-byte header length, the JSON header, then the tensors)
    assert ev["rows"][0]["bytes"] == sum(
        f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in files
    )
    again = tmp_path / "again"  # the saved plan exported from disk: each block's GPTQ codes made as it is read
    plan_argv = ["--plan", str(out / "plan.json"), *argv[-6:], "--offload", "disk", "--out", str(again)]
    assert cli.main(["quantize", *plan_argv]) == 0
    same_checkpoint(out / "model", again / "model")


def test_q4km_is_llama_cpp_rule(real_cache, tmp_path):
    """Our Q4_K_M plan gives Q6_K to the same tensors as llama.cpp's own Q4_K_M file."""
    from layerwise import load
    from layerwise.quant.gguf import _more_bits, llama_quantize, source_gguf

    lm = load("default")
    theirs = gguf_tensors(llama_quantize(source_gguf(lm), tmp_path / "q4km.gguf", "Q4_K", pure=False))
    n = lm.anatomy.n_layers
    for i in range(n):
        for kind in ("attn_v", "ffn_down"):
            t = theirs[f"blk.{i}.{kind}.weight"].tensor_type.name
            # llama.cpp stores Q6_K as Q8_0 where a row of 576 cannot hold 256-blocks
            assert (t in ("Q6_K", "Q8_0")) == _more_bits(i, n), (i, kind, t)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--bits", "3"], "below the cheapest"),
        (["--bits", "9"], "above the dearest"),
        (["--bits", "5", "--export", "hf"], "not available for --format gguf"),
        (["--bits", "5", "--strategy", "measured,uniform", "--export", "gguf"], "writes one model"),
        (["--bits", "5", "--strategy", "best"], "unknown --strategy"),
        (["--bits", "3", "--format", "int", "--group-size", "1024"], "larger than a row"),
        (["--bits", "5", "--format", "int", "--group-size", "128", "--export", "hf"], "does not divide rows of 576"),
        (["--bits", "5", "--format", "int", "--no-symmetric", "--export", "hf"], "symmetric codes only"),
        (["--bits", "5", "--format", "int", "--export", "gguf"], "not available for --format int"),
        (["--bits", "5", "--group-size", "64"], "use --format int"),
        (["--size", "1MB"], "smaller than the cheapest plan's"),
        (["--bits", "5", "--tie", "q,k"], "q,k is not such a group"),
        (["--bits", "5", "--tie", "gate,up", "--strategy", "q4km"], "leave out --tie"),
        (["--size", "90MB", "--format", "int"], "targets a GGUF file's size"),
        (["--bits", "5", "--imatrix", "MISSING"], "cannot read the importance matrix"),
        (["--bits", "5", "--imatrix", "WRONG"], "it was made for another model"),
        (["--bits", "5", "--format", "int", "--imatrix", "MISSING"], "integer formats do not use one"),
        (["--bits", "5", "--imatrix", "none", "--types", "Q4_K,IQ2_XXS"], "IQ2_XXS only with an importance matrix"),
        (["--bits", "5", "--types", "Q4_K,Q9_K"], "unknown GGUF type 'Q9_K' in --types"),
        (["--bits", "5", "--format", "int", "--types", "Q4_K"], "integer formats choose among bits"),
        (["--bits", "5", "--embedding", "Q9"], "unknown GGUF type 'Q9' in --embedding"),
        (["--bits", "5", "--format", "int", "--embedding", "q4_k"], "integer formats keep the embedding"),
        (["--bits", "5", "STALE"], "is stale"),
        (["--bits", "5", "CORRUPT"], "not a readable measurement"),
    ],
)
def test_quantize_bad_input_is_one_line(argv, match, tmp_path, capsys, real_cache):
    out = tmp_path / "out"
    if "WRONG" in argv:  # an importance matrix of another model
        from layerwise.quant.imatrix import compute

        from .conftest import tiny_lm, tiny_windows

        wrong = compute(tiny_lm("llama", layers=2), tiny_windows(2), progress=False).save(tmp_path / "wrong.gguf")
        argv = [str(wrong) if a == "WRONG" else a for a in argv]
    if argv[-1] in ("STALE", "CORRUPT"):  # a measurement.json left by another model, or cut short
        out.mkdir()
        text = (
            json.dumps({"meta": {"model_hash": "another-model"}, "groups": {}}) if argv[-1] == "STALE" else '{"meta": {'
        )
        (out / "measurement.json").write_text(text)
        argv = argv[:-1]
    # the fixture's windows: its importance matrix, so the candidate files it made are reused, not made again
    rc = cli.main(["quantize", *argv, "--seq-len", "256", "--samples", "2", "--eval-samples", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and one_error_line(err) and match in err, err
    assert not any(p.suffix in (".gguf", ".html") for p in out.rglob("*")) if out.exists() else True


def test_quantize_from_disk_makes_the_same_plan_and_file(run, tmp_path):
    """The fixture's run again with the weights read block by block from disk: the same plan, its held-out figures
    to 1e-5 and the same GGUF file, byte for byte."""
    out = tmp_path / "disk"
    argv = ["--bits", str(BITS), "--strategy", "measured", "--seq-len", "256", "--samples", "2", "--eval-samples", "3"]
    assert cli.main(["quantize", *argv, "--offload", "disk", "--export", "gguf", "--out", str(out)]) == 0
    a, b = (json.loads((d / "eval.json").read_text()) for d in (run, out))
    assert b["meta"]["offload"] == "disk" and "offload" not in a["meta"]
    (ra,), (rb,) = a["rows"], b["rows"]
    assert ra["plan"] == rb["plan"] and ra["bytes"] == rb["bytes"]
    for k in ("ppl", "delta_nll", "kl", "predicted_delta_nll"):
        assert ra[k] == pytest.approx(rb[k], rel=1e-5), k
    plans = [json.loads((d / "plan.json").read_text())["plans"] for d in (run, out)]
    assert [{g: e["config"] for g, e in next(iter(p.values()))["groups"].items()} for p in plans] == [
        {g: e["config"] for g, e in next(iter(plans[0].values()))["groups"].items()}
    ] * 2
    assert (run / "model.gguf").read_bytes() == (out / "model.gguf").read_bytes()


def test_llama_cpp_failure_says_why_in_one_line(tmp_path, real_cache, capfd):
    """When llama.cpp's quantizer fails, its own reason (from the log it writes past Python) ends the one-line
    error, the log stays off the terminal, and no partial file is left."""
    from layerwise import load
    from layerwise.errors import LayerwiseError
    from layerwise.quant.gguf import llama_quantize, source_gguf
    from layerwise.quant.imatrix import compute

    from .conftest import tiny_lm, tiny_windows

    wrong = compute(tiny_lm("llama", layers=2), tiny_windows(2), progress=False)  # widths of another model
    with pytest.raises(LayerwiseError, match=r"could not quantize .* to Q4_0 \(.*imatrix size \d+ is different"):
        llama_quantize(source_gguf(load("default")), tmp_path / "x.gguf", "Q4_0", imatrix=wrong)
    assert "converting to" not in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []
