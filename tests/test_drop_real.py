"""`layerwise drop` end to end on the real default model: checkpoint, GGUF in llama.cpp, orders."""

import json
import math

import pytest
import torch

from layerwise import cli

from .conftest import one_error_line

pytestmark = pytest.mark.real

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'


@pytest.fixture(scope="module")
def dropped(tmp_path_factory, real_cache):
    out = tmp_path_factory.mktemp("drop") / "run"
    rc = cli.main(
        [
            "drop",
            "--units",
            "L4,L11,L20.attn,L26.mlp",
            "--seq-len",
            "64",
            "--samples",
            "2",
            "--eval-samples",
            "3",
            "--export",
            "hf,gguf",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out


def test_drop_cli_writes_results(dropped):
    data = json.loads((dropped / "eval.json").read_text())
    (v,) = data["variants"]
    assert v["units"] == ["L4", "L11", "L20.attn", "L26.mlp"]
    for key in ("ppl", "delta_nll", "kl", "prefill_tok_s", "generate_tok_s", "params"):
        assert math.isfinite(v[key]), key
    assert v["delta_nll"] > 0 and v["kl"] > 0 and v["params"] < data["original"]["params"]
    assert data["exports"]["gguf"]["bytes"] < data["exports"]["gguf"]["source_bytes"]
    assert "<img" in (dropped / "report.html").read_text()
    assert cli.main(["report", str(dropped / "eval.json"), "--out", str(dropped / "again.html")]) == 0
    assert "L20.attn" in (dropped / "again.html").read_text()


def test_config_runs_the_recorded_drop_again(dropped, tmp_path):
    """``--config RESULT`` on the default model: the recorded flags and inputs (model, data, windows) come back, the
    flags given beside it win, and the same units measure the same quality on the same held-out windows."""
    first = json.loads((dropped / "eval.json").read_text())
    assert first["meta"]["config"]["units"] == ["L4", "L11", "L20.attn", "L26.mlp"]
    assert first["meta"]["config"]["inputs"]["seq_len"] == 64
    argv = ["drop", "--config", str(dropped), "--export", "none", "--no-speed", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["meta"]["config"] == {**first["meta"]["config"], "export": [], "with_speed": False}
    assert again["meta"]["data"] == first["meta"]["data"] and again["meta"]["model_hash"] == first["meta"]["model_hash"]
    (a,), (b,) = first["variants"], again["variants"]
    assert a["units"] == b["units"] and math.isclose(a["delta_nll"], b["delta_nll"], rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(a["kl"], b["kl"], rel_tol=1e-6, abs_tol=1e-9) and not (tmp_path / "model").exists()


def test_checkpoint_loads_in_plain_transformers_and_layerwise(dropped):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import layerwise as lw
    from layerwise.trace import skip

    model = AutoModelForCausalLM.from_pretrained(dropped / "model").eval()
    tok = AutoTokenizer.from_pretrained(dropped / "model")
    assert model.config.num_hidden_layers == 28
    ids = tok(PROMPT, return_tensors="pt").input_ids
    original = lw.load("default", device="cpu")
    with torch.no_grad(), skip(original.anatomy, ["L4", "L11", "L20.attn", "L26.mlp"]):
        want = original.model(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        cached = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        x = ids
        for _ in range(8):
            x = torch.cat([x, model(input_ids=x, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached, x)  # the KV cache is consistent with the renumbered layers
    again = lw.load(str(dropped / "model"), device="cpu")
    assert again.source["skipped_sublayers"] == ["L18.attn", "L24.mlp"]  # renumbered after two blocks went
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids, use_cache=False).logits, want, atol=1e-4, rtol=1e-4)


def test_saved_plan_applies_and_exports_again(dropped, tmp_path):
    """DropPlan.load(...).apply(lm) gives the saved checkpoint's logits; --plan writes the same GGUF file, measuring
    nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import layerwise as lw
    from layerwise.drop import DropPlan

    plan = DropPlan.load(dropped / "plan.json")
    assert plan.units == ["L4", "L11", "L20.attn", "L26.mlp"] and plan.model_hash
    ids = AutoTokenizer.from_pretrained(dropped / "model")(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad(), plan.apply(lw.load("default", device="cpu")) as small:
        got = small(input_ids=ids, use_cache=False).logits
        want = AutoModelForCausalLM.from_pretrained(dropped / "model").eval()(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (
        cli.main(
            [
                "drop",
                "--plan",
                str(dropped / "plan.json"),
                "--export",
                "gguf",
                "--seq-len",
                "32",
                "--samples",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "model.gguf").read_bytes() == (dropped / "model.gguf").read_bytes()


def test_gguf_runs_in_llama_cpp(dropped):
    """llama.cpp loads the cut GGUF and predicts like the checkpoint (same Q4_1 weights, its own kernels)."""
    import gguf
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    reader = gguf.GGUFReader(str(dropped / "model.gguf"))
    assert int(reader.get_field("llama.block_count").contents()) == 28
    llm = Llama(model_path=str(dropped / "model.gguf"), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    toks = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(toks)
    ours_model = AutoModelForCausalLM.from_pretrained(dropped / "model").eval()
    with torch.no_grad():
        ours = ours_model(input_ids=torch.tensor([toks]), use_cache=False).logits[0]
    theirs = torch.tensor(llm.scores[: len(toks)])
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    target = torch.tensor(toks[1:])
    nll = lambda z: torch.nn.functional.cross_entropy(z[:-1].float(), target).item()  # noqa: E731
    assert abs(math.exp(nll(theirs)) / math.exp(nll(ours)) - 1) < 0.05


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--units", "L40"], "out of range"),
        (["--units", ",".join(f"L{i}" for i in range(30))], "leaves no model"),
        (["--n", "30", "--unit", "block"], "leaves no model"),
        (["--n", "61", "--unit", "any"], "more than the 60"),
        (["--n", "2", "--profile", "PROFILE"], "another model"),
    ],
)
def test_drop_bad_input_is_one_line(argv, match, tmp_path, capsys, real_cache):
    fake = tmp_path / "profile.json"
    fake.write_text(json.dumps({"meta": {"model_hash": "0" * 64, "n_layers": 30}, "units": []}))
    argv = [str(fake) if a == "PROFILE" else a for a in argv]
    rc = cli.main(["drop", *argv, "--seq-len", "32", "--samples", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and one_error_line(err) and match in err, err
    assert not (tmp_path / "out").exists()
