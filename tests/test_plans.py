"""Saved plans, on tiny models: each kind saved by a run, loaded back with one call, applied to a freshly loaded
model with the weights and logits of the run that made it, exported again without measuring, refused for another
model."""

import json

import pytest
import torch

from layerwise import cli
from layerwise.errors import LayerwiseError

from .conftest import one_error_line, records_peak, tiny_lm, tiny_windows


def _split(n_calib: int = 4, n_eval: int = 3):
    w = tiny_windows(n_calib + n_eval, seed=1)
    w.n_calib = n_calib
    return w


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _tensor_bytes(folder) -> int:
    """Bytes of tensor data in a checkpoint's safetensors files (each: 8-byte header length, JSON header, tensors)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += f.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    return total


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _other(lm):
    lm.source["model_hash"] = "another"
    return lm


def test_drop_plan_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerwise import drop as dp

    lm, w = tiny_lm("llama", layers=4), _split()
    plan = dp.choose(lm, w, n=2, unit="any", order="sub_cos", progress=False)
    assert plan.model_hash == "tiny"
    dp.run(lm, w, plans=[plan], out=tmp_path / "run", export=("hf",), eval_samples=3, with_speed=False, progress=False)
    loaded = dp.DropPlan.load(tmp_path / "run" / "plan.json")
    assert loaded == plan and dp.DropPlan.load(plan.save(tmp_path / "alone")) == plan
    fresh = tiny_lm("llama", layers=4)  # the same weights, loaded again
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    with loaded.apply(fresh) as small:
        got = _logits(small, w.ids)
    with dp.applied(lm, plan) as small:
        want = _logits(small, w.ids)
    assert torch.equal(got, want)
    torch.testing.assert_close(_logits(saved, w.ids), got, rtol=0, atol=1e-5)
    assert torch.equal(_logits(fresh.model, w.ids), _logits(lm.model, w.ids))  # the loaded model is untouched after
    # exported again from the saved plan, nothing measured: the same checkpoint
    exports = dp.export_plan(fresh, loaded, tmp_path / "again", ("hf",))
    assert exports["hf"]["bytes"] > 0
    first, again = _tensors(tmp_path / "run" / "model"), _tensors(tmp_path / "again" / "model")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    for call in (
        lambda: loaded.apply(_other(tiny_lm("llama", layers=4))),
        lambda: dp.export_plan(_other(tiny_lm("llama", layers=4)), loaded, tmp_path / "x", ("hf",)),
    ):
        with pytest.raises(LayerwiseError, match="made for another model"):
            call()
    assert not (tmp_path / "x").exists()


def test_drop_plan_of_a_sweep_is_picked_by_key(tmp_path):
    from layerwise import drop as dp

    lm, w = tiny_lm("llama", layers=4), _split()
    plans = dp.sweep_plans(lm, w, sweep=[1, 2], unit=["block"], order=["bi"], progress=False)
    dp.run(lm, w, plans=plans, out=tmp_path, eval_samples=3, with_speed=False, progress=False)
    with pytest.raises(LayerwiseError, match="holds 2 plans; choose one with `key`"):
        dp.DropPlan.load(tmp_path)
    assert dp.DropPlan.load(tmp_path, "block/bi/2").units == plans[1].units
    with pytest.raises(LayerwiseError, match="holds a drop plan, not a quantize plan"):
        __import__("layerwise.quantize").quantize.QuantPlan.load(tmp_path, "block/bi/2")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quant_plan_round_trip(tmp_path, method):
    from transformers import AutoModelForCausalLM

    from layerwise import quantize as qz
    from layerwise.evaluate import next_token_logits, quality
    from layerwise.quant.rtn import QConfig

    lm, w = tiny_lm("llama"), _split()
    rep = qz.run(
        lm,
        w,
        bits=4.8,
        strategy=["measured"],
        format="int",
        method=method,
        out=tmp_path / "run",
        eval_samples=3,
        seed=3,
        batch_size=2,
        progress=False,
    )
    plan = qz.QuantPlan.load(tmp_path / "run" / "plan.json", "measured@4.8")
    assert qz.QuantPlan.load(plan.save(tmp_path / "alone")) == plan
    assert plan.method == method and all(isinstance(c, QConfig) and c.symmetric for c in plan.configs.values())
    assert len(set(plan.configs.values())) > 1 and len(plan.configs) == 3 * 7  # one config per linear map
    fresh = tiny_lm("llama")
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()  # the run's own weights
    want = _logits(exported, w.ids)  # compressed-tensors decompresses on the first forward
    with plan.apply(fresh, w):
        for path in plan.configs:
            assert torch.equal(fresh.model.get_submodule(path).weight, exported.get_submodule(path).weight), path
        got = _logits(fresh.model, w.ids)
    torch.testing.assert_close(want, got, rtol=0, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in fresh.model.named_parameters())  # weights back after the with
    q = quality(
        next_token_logits(fresh.model),
        {"p": next_token_logits(fresh.model, lambda: plan.apply(fresh, w))},
        w.evaluation[:3],
        batch_size=2,
    )
    assert q["p"]["ppl"] == pytest.approx(rep.rows[0]["ppl"], rel=1e-6)
    # exported again from the saved plan: the same tensors
    qz.export_plan(fresh, plan, tmp_path / "again", ("hf",), w.evaluation[:3], w)
    first, again = _tensors(tmp_path / "run" / "model"), _tensors(tmp_path / "again" / "model")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # the reported size is the size of the tensors in the file written
    row = rep.rows[0]
    assert row["bytes"] == _tensor_bytes(tmp_path / "run" / "model")
    weights = rep.original["quantized_weights"] + rep.original["other_weights"]
    assert row["bpw_model"] == pytest.approx(8 * row["bytes"] / weights, rel=1e-6)
    # every result file says how it was made
    for name in ("plan.json", "eval.json", "measurement.json"):
        meta = json.loads((tmp_path / "run" / name).read_text())["meta"]
        assert (
            (meta["seed"], meta["batch_size"], meta["model_hash"]) == (3, 2, "tiny")
            and meta["versions"]["torch"]
            and meta["command"]
        ), name
    assert records_peak(json.loads((tmp_path / "run" / "eval.json").read_text())["meta"])
    with pytest.raises(LayerwiseError, match="made for another model"):
        plan.apply(_other(tiny_lm("llama")), w)
    if method == "gptq":
        with pytest.raises(LayerwiseError, match="other calibration windows"):
            plan.apply(fresh, _split(n_calib=3))
        with pytest.raises(LayerwiseError, match="pass `windows`"):
            plan.apply(fresh)


def test_cli_exports_saved_plans_without_measuring(tmp_path, monkeypatch, capsys):
    """`drop --plan` and `quantize --plan` write the files of a saved plan; another model's plan is one error line."""
    import layerwise.quant.measure as qm

    lm, w = tiny_lm("llama", layers=4), _split()
    monkeypatch.setattr(cli, "_load", lambda args, attn_implementation=None, **_: (lm, w))
    monkeypatch.setattr(cli, "_memory_plan", lambda args, make: ("none", None))
    assert cli.main(["drop", "--n", "1", "--no-speed", "--eval-samples", "3", "--out", str(tmp_path / "d")]) == 0
    assert (
        cli.main(["quantize", "--format", "int", "--bits", "4.8", "--eval-samples", "3", "--out", str(tmp_path / "q")])
        == 0
    )
    assert (tmp_path / "d" / "report.html").exists() and (tmp_path / "q" / "report.html").exists()
    meta = json.loads((tmp_path / "d" / "eval.json").read_text())["meta"]
    assert (
        meta["command"] == f"layerwise drop --n 1 --no-speed --eval-samples 3 --out {tmp_path / 'd'}"
        and meta["seed"] == 0
    )
    capsys.readouterr()

    def no_measuring(*a, **k):
        raise AssertionError("a saved plan is exported without measuring")

    monkeypatch.setattr(qm, "measure", no_measuring)
    monkeypatch.setattr("layerwise.drop.profile", no_measuring)
    assert cli.main(["drop", "--plan", str(tmp_path / "d" / "plan.json"), "--out", str(tmp_path / "d2")]) == 0
    assert (
        cli.main(
            [
                "quantize",
                "--plan",
                str(tmp_path / "q"),
                "--export",
                "hf",
                "--eval-samples",
                "3",
                "--out",
                str(tmp_path / "q2"),
            ]
        )
        == 0
    )
    for run, again in (("d", "d2"), ("q", "q2")):
        first, second = _tensors(tmp_path / run / "model"), _tensors(tmp_path / again / "model")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    capsys.readouterr()
    lm.source["model_hash"] = "another"
    for argv in (
        ["drop", "--plan", str(tmp_path / "d" / "plan.json")],
        ["quantize", "--plan", str(tmp_path / "q" / "plan.json")],
    ):
        assert cli.main([*argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert one_error_line(err) and "the plan was made for another model" in err, err
    assert not (tmp_path / "x").exists()
