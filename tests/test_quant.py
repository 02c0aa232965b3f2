"""Group-wise RTN and GPTQ against their definitions."""

import pytest
import torch

from layerwise.errors import LayerwiseError
from layerwise.quant import Hessian, QConfig, quantize_gptq, quantize_rtn, strategies


def _w(out=24, n=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * 0.05


@pytest.mark.parametrize(
    "bits,group,sym", [(4, 64, False), (3, 100, False), (2, 32, False), (8, 576, False), (4, 64, True), (3, 100, True)]
)
def test_rtn_rounds_to_nearest_grid_point(bits, group, sym):
    """Codes and the weights they give back, by METHODS.md's formulas element by element."""
    w = _w()
    q = quantize_rtn(w, QConfig(bits, group, sym))
    deq = q.dequantize()
    n_groups = -(-576 // group)
    assert q.scales.shape == (24, n_groups) and (q.zeros is None) == sym
    assert int(q.codes.max()) <= 2**bits - 1
    step = q.scales.repeat_interleave(group, dim=1)[:, :576]
    # nearest point of a grid that covers the group, up to the fp16 rounding of the scale (2^-11, times the levels)
    assert ((w - deq).abs() <= step * (0.5 + 2**bits * 2**-11) + 1e-6).all()
    assert (w - deq).abs().mean() < 0.3 * step.mean()
    # each weight by the formula, with its group's scale and zero point (the short last group too), exactly
    zero = 2 ** (bits - 1) if sym else q.zeros.float().repeat_interleave(group, dim=1)[:, :576]
    codes = (torch.round(w / step) + zero).clamp(1 if sym else 0, 2**bits - 1)
    assert torch.equal(q.codes, codes.to(torch.uint8)) and torch.equal(deq, (codes - zero) * step)
    # the last, shorter group (576 = 5 * 100 + 76) has its own range
    if group == 100:
        tail = w[:, 500:]
        want = (
            (tail.abs().amax(1) / (2 ** (bits - 1) - 1))
            if sym
            else (tail.amax(1).clamp(min=0) - tail.amin(1).clamp(max=0)) / (2**bits - 1)
        )
        torch.testing.assert_close(q.scales[:, -1], want.half().float())


def test_storage_cost_is_exact():
    cfg = QConfig(4, 64)
    assert cfg.storage_bits(1, 576) == 576 * 4 + 9 * (16 + 4)
    assert cfg.bits_per_weight(576) == pytest.approx(4.3125)
    assert QConfig(3, 100, symmetric=True).storage_bits(2, 576) == 2 * (576 * 3 + 6 * 16)
    assert QConfig(4, 4, symmetric=True).storage_bits(1, 12) == 64 + 3 * 16  # a row's codes fill whole int32 words


def test_bad_configs():
    with pytest.raises(LayerwiseError, match="2 to 8"):
        QConfig(9, 64)
    with pytest.raises(LayerwiseError, match="larger than a row"):
        quantize_rtn(_w(n=32), QConfig(4, 64))


def test_gptq_with_identity_hessian_is_rtn():
    w = _w()
    h = torch.eye(576, dtype=torch.float64)
    cfg = QConfig(3, 64)
    assert torch.equal(quantize_gptq(w, h, cfg, damp=0.0).codes, quantize_rtn(w, cfg).codes)


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(sym):
    g = torch.Generator().manual_seed(1)
    n = 576
    basis = torch.randn(32, n, generator=g)
    x = torch.randn(4096, 32, generator=g) @ basis + 0.1 * torch.randn(4096, n, generator=g)
    acc = Hessian(n)
    for part in x.split(1000):
        acc.add(part)
    torch.testing.assert_close(acc.value, 2 * x.double().T @ x.double() / 4096)
    w = _w(out=32)
    cfg = QConfig(3, 64, sym)

    def out_err(deq):
        return ((x @ (w - deq).T) ** 2).sum() / ((x @ w.T) ** 2).sum()

    e_rtn = out_err(quantize_rtn(w, cfg).dequantize())
    e_gptq = out_err(quantize_gptq(w, acc.value, cfg).dequantize())
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_many_equals_one_config_at_a_time(sym):
    """Stacking bit widths along the rows changes nothing: every config's codes, scales and zeros are its own."""
    from layerwise.quant.gptq import inverse_factor, quantize_gptq_many

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 200, generator=g) + 0.1 * torch.randn(
        2048, 200, generator=g
    )
    acc = Hessian(200)
    acc.add(x)
    w = _w(out=12, n=200, seed=3)
    cfgs = [QConfig(b, 48, sym) for b in (2, 3, 5, 8)]  # 200 = 4 * 48 + 8: a short last group too
    for cfg, got in zip(cfgs, quantize_gptq_many(w, inverse_factor(acc.value), cfgs)):
        want = quantize_gptq(w, acc.value, cfg)
        assert got.config == cfg
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert (got.zeros is None and want.zeros is None) or torch.equal(got.zeros, want.zeros)
        assert int(got.codes.max()) <= 2**cfg.bits - 1
    with pytest.raises(ValueError):
        quantize_gptq_many(w, inverse_factor(acc.value), [QConfig(4, 48), QConfig(4, 64)])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_codes_rows_equal_each_matrix_alone(method):
    """A fused group's maps quantized as one row-stacked matrix get exactly the codes each would get alone."""
    from layerwise.quant.measure import GroupCandidates

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1024, 100, generator=g)
    acc = Hessian(100)
    acc.add(x)
    ws = [_w(out=o, n=100, seed=s) for o, s in ((12, 5), (4, 6), (4, 7))]  # q, k, v of different heights
    cands = GroupCandidates((QConfig(3, 32),), method)
    for w, got in zip(ws, cands.codes_rows(ws, "a3g32", acc.value)):
        want = cands.codes("", w, "a3g32", acc.value)
        assert (
            got.codes.shape == w.shape and torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        )
        assert torch.equal(got.zeros, want.zeros)


SMALL = tuple(QConfig(b, 16) for b in (2, 4, 8))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_measurement_matches_an_independent_forward(arch):
    from layerwise.quant.measure import matrix, measure, replaced
    from layerwise.trace import tap

    from .conftest import tiny_lm, tiny_windows

    lm = tiny_lm(arch)
    w = tiny_windows(2)
    m = measure(lm, w, candidates=SMALL, progress=False)
    an = lm.anatomy
    assert len(m.groups) == 3 * 4
    for name in ("L1.attn.qkv", "L1.mlp.down"):
        entry = m.groups[name]
        errs = [entry["configs"][c.name]["err"] for c in SMALL]
        assert errs[0] > errs[1] > errs[2] > 0  # more bits, less error
        (group,) = [mods for g, mods in an.quant_groups(1) if g == name]
        cfg = SMALL[1]
        deq = {mod: quantize_rtn(matrix(mod), cfg).dequantize() for _, mod in group}
        kind = name.split(".")[1]

        def update(tr_list):
            t = tr_list[1]
            return (t.attn if kind == "attn" else t.mlp).double()

        with torch.no_grad():
            ref, got = [], []
            with tap(an, ref.append):
                lm.model(input_ids=w.ids, use_cache=False)
            with replaced(deq), tap(an, got.append):
                lm.model(input_ids=w.ids, use_cache=False)
        y, yq = update(ref), update(got)
        assert entry["configs"][cfg.name]["rel"] == pytest.approx(float(((yq - y) ** 2).sum() / (y**2).sum()), rel=1e-4)
        # err: the second-order loss change 1/2 sum g^2 delta^2 per predicted token, with g the gradient of
        # the summed next-token NLL with respect to the sublayer's update, taken here by plain autograd.
        kept = {}

        def keep(_m, _a, out):
            t = out[0] if isinstance(out, tuple) else out
            t.retain_grad()
            kept["y"] = t

        handle = an.update_module(1, kind).register_forward_hook(keep)
        try:
            logits = lm.model(input_ids=w.ids, use_cache=False).logits[:, :-1]
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), w.ids[:, 1:].flatten(), reduction="sum").backward()
        finally:
            handle.remove()
            lm.model.zero_grad(set_to_none=True)
        g2 = kept["y"].grad.double()[:, :-1] ** 2
        want = 0.5 * float((g2 * (yq - y)[:, :-1] ** 2).sum()) / g2[..., 0].numel()
        assert entry["configs"][cfg.name]["err"] == pytest.approx(want, rel=1e-3)
        assert entry["configs"][cfg.name]["bits"] == sum(cfg.storage_bits(*mod.shape) for _, mod in group)


def test_measurement_resumes_and_refuses_stale_files(tmp_path):
    import json

    from layerwise.quant.measure import measure

    from .conftest import tiny_lm, tiny_windows

    lm, w = tiny_lm("llama"), tiny_windows(2)
    path = tmp_path / "measurement.json"
    full = measure(lm, w, candidates=SMALL, path=path, progress=False)
    d = json.loads(path.read_text())
    for g in [g for g in d["groups"] if g.startswith("L2.")]:
        del d["groups"][g]
    path.write_text(json.dumps(d))
    again = measure(lm, w, candidates=SMALL, path=path, progress=False)
    assert again.groups == full.groups
    d["meta"]["model_hash"] = "other"
    path.write_text(json.dumps(d))
    with pytest.raises(LayerwiseError, match="stale.*model_hash"):
        measure(lm, w, candidates=SMALL, path=path, progress=False)
    path.write_text("{not json")
    with pytest.raises(LayerwiseError, match="not a readable measurement"):
        measure(lm, w, candidates=SMALL, path=path, progress=False)


def test_gptq_measurement_is_no_worse_than_rtn():
    from layerwise.quant.measure import measure

    from .conftest import tiny_lm, tiny_windows

    lm, w = tiny_lm("qwen2"), tiny_windows(4)
    cfg = (QConfig(3, 16),)
    rtn = measure(lm, w, candidates=cfg, progress=False)
    gptq = measure(lm, w, candidates=cfg, method="gptq", progress=False)
    total = lambda m: sum(g["configs"]["a3g16"]["err"] for g in m.groups.values())  # noqa: E731
    assert total(gptq) < total(rtn)


def _synthetic(n_groups=4, seed=0):
    import random

    from layerwise.quant.measure import Measurement

    rnd = random.Random(seed)
    groups = {}
    for i in range(n_groups):
        numel = rnd.choice([100, 200, 300])
        configs = {}
        for bits in (2, 3, 4, 6, 8):
            configs[f"a{bits}g32"] = {"bits": int(numel * (bits + 0.6)), "err": rnd.uniform(0.5, 2) * 4.0 ** (-bits)}
        groups[f"L{i}.attn.qkv"] = {"layer": i, "sublayer": "attn", "numel": numel, "configs": configs}
    return Measurement({"model_hash": "x"}, groups)


@pytest.mark.parametrize("target", [2.7, 3.5, 4.1, 5.9, 8.5])
def test_solver_is_exact_against_brute_force(target):
    import itertools

    from layerwise.quant.allocate import solve

    meas = _synthetic()
    names = list(meas.groups)
    weights = {g: 1.0 + i for i, g in enumerate(names)}
    N = sum(g["numel"] for g in meas.groups.values())
    best = None
    for combo in itertools.product(*(meas.groups[g]["configs"] for g in names)):
        bits = sum(meas.groups[g]["configs"][c]["bits"] for g, c in zip(names, combo))
        if bits <= target * N:
            err = sum(weights[g] * meas.groups[g]["configs"][c]["err"] for g, c in zip(names, combo))
            best = min(best or (err, combo), (err, combo))
    plan = solve(meas, target, weights=weights, resolution=100000)
    assert plan.predicted_error == pytest.approx(best[0], rel=1e-9)
    assert plan.bpw <= target + 1e-9


def test_solver_refuses_impossible_budgets():
    from layerwise.quant.allocate import solve

    meas = _synthetic()
    with pytest.raises(LayerwiseError, match="below the cheapest plan"):
        solve(meas, 2.0)
    with pytest.raises(LayerwiseError, match="above the dearest plan"):
        solve(meas, 9.0)


def test_ranked_lowers_the_least_important_blocks():
    from layerwise.quant.allocate import ranked, uniform

    meas = _synthetic(n_groups=4)
    plan = ranked(meas, [2, 0, 3, 1], 3.5, "a2g32", "a4g32", metric="bi")
    lowered = plan.meta["lowered_blocks"]
    assert lowered == sorted([2, 0, 3, 1][: plan.meta["k"]]) and plan.bpw <= 3.5
    assert all(plan.configs[f"L{i}.attn.qkv"] == ("a2g32" if i in lowered else "a4g32") for i in range(4))
    assert uniform(meas, "a4g32").bpw == pytest.approx(4.6, abs=0.01)


def test_fake_quantized_model_uses_the_plan_and_restores():
    from layerwise.quant.allocate import uniform
    from layerwise.quant.apply import plan_weights
    from layerwise.quant.measure import GroupCandidates, matrix, measure, replaced

    from .conftest import tiny_lm, tiny_windows

    lm, w = tiny_lm("gpt2"), tiny_windows(2)
    meas = measure(lm, w, candidates=SMALL, progress=False)
    weights = plan_weights(lm, meas, uniform(meas, "a2g16"), GroupCandidates(SMALL))
    before = {m: matrix(m) for m in weights}
    with torch.no_grad():
        full = lm.model(input_ids=w.ids).logits
        with replaced(weights):
            for m, deq in weights.items():
                torch.testing.assert_close(matrix(m), deq)
            q = lm.model(input_ids=w.ids).logits
    assert not torch.allclose(q, full, atol=1e-3)
    assert all(torch.equal(matrix(m), v) for m, v in before.items())


def test_gptq_plans_run_block_by_block_on_quantized_inputs():
    """Block 1's GPTQ sees the inputs that block 0, already quantized, produces (checked by hand)."""
    from layerwise.quant.allocate import uniform
    from layerwise.quant.apply import plan_weights
    from layerwise.quant.gptq import Hessian, quantize_gptq
    from layerwise.quant.measure import GroupCandidates, measure, replaced

    from .conftest import tiny_lm, tiny_windows

    lm, w = tiny_lm("llama"), tiny_windows(2)
    cands = GroupCandidates(SMALL, "gptq")
    meas = measure(lm, w, candidates=cands, progress=False)
    plan = uniform(meas, "a2g16")
    weights = plan_weights(lm, meas, plan, cands, w)
    an = lm.anatomy
    first = [an.weight(p) for _, mods in an.quant_groups(0) for p, _ in mods]
    block0 = {m: v for m, v in weights.items() if any(m.module is mod.module for mod in first)}
    q1 = an.blocks[1].self_attn.q_proj
    hess = Hessian(q1.in_features)
    handle = q1.register_forward_pre_hook(lambda _m, args: hess.add(args[0]))
    try:
        with torch.no_grad(), replaced(block0):
            lm.model(input_ids=w.ids, use_cache=False)
    finally:
        handle.remove()
    want = quantize_gptq(q1.weight.detach().float(), hess.value, SMALL[0]).dequantize()
    torch.testing.assert_close(next(v for m, v in weights.items() if m.module is q1), want)
    with pytest.raises(LayerwiseError, match="calibration windows"):
        plan_weights(lm, meas, plan, cands)


def _split_windows(n_calib: int = 4, n_eval: int = 3):
    from layerwise.data import Windows

    g = torch.Generator().manual_seed(1)
    n = n_calib + n_eval
    return Windows(
        ids=torch.randint(0, 97, (n, 16), generator=g),
        n_calib=n_calib,
        source="random",
        data_hash="x",
        n_text_tokens=n * 16,
    )


@pytest.mark.parametrize(
    "target, narrower", [(6.0, ("floor 5", {"a4g16", "a8g16"})), (4.0, ("band a2g16-a4g16", {"a2g16", "a4g16"}))]
)
def test_measured_keeps_the_choice_with_the_least_calibration_loss(target, narrower):
    """The solver also runs on narrower choices (a floor on the width, the band that brackets the budget); the plan
    kept is the one the calibration windows prefer."""
    from layerwise.evaluate import next_token_logits, quality
    from layerwise.quant.allocate import solve
    from layerwise.quant.apply import plan_weights
    from layerwise.quant.measure import GroupCandidates, measure, replaced

    from .conftest import tiny_lm

    lm, w = tiny_lm("llama"), _split_windows()
    cands = GroupCandidates(SMALL)  # uniform plans at 3.125, 5.25 and 9.5 bits per weight
    meas = measure(lm, w, candidates=cands, progress=False)
    got = strategies.measured(lm, w, meas, cands, target)
    plans = {"any width": solve(meas, target), narrower[0]: solve(meas, target, allowed=narrower[1])}
    assert (
        plans["any width"].configs != plans[narrower[0]].configs
    )  # on this model the narrower choice matters, so both are run
    assert got.bpw <= target + 1e-9 and got.configs in [a.configs for a in plans.values()]
    runs = {
        k: next_token_logits(lm.model, lambda a=a: replaced(plan_weights(lm, meas, a, cands))) for k, a in plans.items()
    }
    q = quality(next_token_logits(lm.model), runs, w.calibration)
    assert got.meta["calibration_delta_nll"] == pytest.approx({k: v["delta_nll"] for k, v in q.items()}, abs=1e-9)
    best = min(plans, key=lambda k: q[k]["delta_nll"])
    assert got.meta["choice"] == best and got.configs == plans[best].configs


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_hf_export_loads_in_plain_transformers_with_the_plans_weights(tmp_path, method):
    """The compressed-tensors checkpoint holds the plan's own codes: transformers' weights equal the fake-quantized
    ones."""
    import json

    from transformers import AutoModelForCausalLM

    from layerwise import quantize as qz
    from layerwise.quant.allocate import fixed
    from layerwise.quant.apply import plan_weights
    from layerwise.quant.measure import Measurement, replaced

    from .conftest import tiny_lm

    lm, w = tiny_lm("llama"), _split_windows()
    rep = qz.run(
        lm,
        w,
        bits=4.8,
        strategy=["measured"],
        format="int",
        method=method,
        out=tmp_path,
        eval_samples=3,
        progress=False,
    )
    plan = next(iter(rep.plans.values()))
    configs = {g: e["config"] for g, e in plan["groups"].items()}
    assert all(c.startswith("s") for c in configs.values()) and len({c for c in configs.values()}) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    # the same plan, made again (GPTQ included) and put into the model by layerwise
    meas = Measurement.load(tmp_path / "measurement.json", {})
    alloc = fixed(meas, configs, "measured")
    weights = plan_weights(lm, meas, alloc, qz.candidates_for(lm, "int", method=method, symmetric=True, sizes=(32,)), w)
    with replaced(weights), torch.no_grad():  # compressed-tensors decompresses on the first forward
        torch.testing.assert_close(loaded(input_ids=w.ids).logits, lm.model(input_ids=w.ids).logits, rtol=0, atol=1e-5)
    names = {m: n for n, m in lm.model.named_modules()}
    for m, deq in weights.items():
        assert torch.equal(loaded.get_submodule(names[m.module]).weight, deq)
    assert rep.exports["hf"]["transformers_ppl"] == pytest.approx(rep.rows[0]["ppl"], rel=1e-5)
    # one config group per scheme, and fused shards (q/k/v, gate/up) under the same one
    qc = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    scheme = {
        t: (g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["symmetric"])
        for g in qc["config_groups"].values()
        for t in g["targets"]
    }
    for group, e in plan["groups"].items():
        assert {scheme[p] for p in e["modules"]} == {(int(e["config"][1]), int(e["config"].split("g")[1]), True)}
    assert qc["format"] == "pack-quantized" and "lm_head" in qc["ignore"]


def test_hf_export_refuses_what_cannot_load(tmp_path):
    from layerwise import quantize as qz
    from layerwise.errors import LayerwiseError

    from .conftest import tiny_lm

    w = _split_windows()
    cases = [
        (tiny_lm("llama"), {"symmetric": False}, "symmetric codes only"),
        (tiny_lm("llama"), {"group_size": 24}, "does not divide rows of 32"),
        (tiny_lm("gpt2"), {}, "Conv1D"),
        (tiny_lm("llama"), {"format": "gguf"}, "not available for `family` gguf"),
    ]
    bf16 = tiny_lm("llama")
    bf16.model.to(torch.bfloat16)
    cases.append((bf16, {}, "`dtype` float16 or float32"))
    for lm, kw, msg in cases:
        with pytest.raises(LayerwiseError, match=msg):
            qz.run(
                lm,
                w,
                bits=4.8,
                strategy=["measured"],
                **{"format": "int", **kw},
                export=("hf",),
                out=tmp_path,
                progress=False,
            )
        assert not (tmp_path / "measurement.json").exists()


def test_gptq_plans_are_scored_on_windows_they_were_not_fitted_to():
    """GPTQ fits a plan's weights to the windows it runs on, so measured's choice scores each plan cross-fitted:
    made on the even calibration windows and scored on the odd ones, and the other way round."""
    from dataclasses import replace

    from layerwise.evaluate import next_token_logits, quality
    from layerwise.quant.allocate import solve
    from layerwise.quant.apply import plan_weights
    from layerwise.quant.measure import GroupCandidates, measure, replaced

    from .conftest import tiny_lm

    lm, w = tiny_lm("llama"), _split_windows()
    cands = GroupCandidates(SMALL, method="gptq")
    meas = measure(lm, w, candidates=cands, progress=False)
    plans = {"any width": solve(meas, 4.0), "band": solve(meas, 4.0, allowed={"a2g16", "a4g16"})}
    got = strategies.calibration_loss(lm, w, meas, cands, plans)
    c = w.calibration
    sums = dict.fromkeys(plans, 0.0)
    for fit, score in ((c[[0, 2]], c[[1, 3]]), (c[[1, 3]], c[[0, 2]])):
        runs = {
            k: next_token_logits(
                lm.model,
                lambda a=a, fit=fit: replaced(plan_weights(lm, meas, a, cands, replace(w, ids=fit, n_calib=2))),
            )
            for k, a in plans.items()
        }
        q = quality(next_token_logits(lm.model), runs, score)
        for k in plans:
            sums[k] += q[k]["delta_nll"] / 2
    assert got == pytest.approx(sums, abs=1e-9)
    own = quality(
        next_token_logits(lm.model),
        {
            k: next_token_logits(lm.model, lambda a=a: replaced(plan_weights(lm, meas, a, cands, w)))
            for k, a in plans.items()
        },
        c,
    )
    assert all(
        abs(got[k] - own[k]["delta_nll"]) > 1e-6 for k in plans
    )  # not the loss on the windows the plan was fitted to


def test_plan_scoring_and_held_out_evaluation_show_progress(capsys):
    """After the measurement, making and scoring the measured plans on the calibration windows and evaluating them held
    out each show a bar (stderr); with progress=False (the CLI's --json) none."""
    from layerwise import quantize as qz
    from layerwise.quant.measure import GroupCandidates, measure

    from .conftest import tiny_lm

    lm, w = tiny_lm("llama"), _split_windows()
    cands = GroupCandidates(SMALL)
    meas = measure(lm, w, candidates=cands, progress=False)
    bars = ("make plans at 6 bits", "score plans at 6 bits", "make plans 1-1 of 1", "evaluate plans 1-1 of 1")
    for progress in (True, False):
        capsys.readouterr()
        allocs = qz.plans(lm, w, meas, cands, [6.0], ["measured"], progress=progress)
        qz.evaluate(lm, w, meas, cands, allocs, w.evaluation, progress=progress)
        err = capsys.readouterr().err
        if progress:
            assert all(f"{bar}: 100%" in err for bar in bars), err
        else:
            assert "%|" not in err and not any(bar in err for bar in bars), err


def test_each_export_runs_its_held_out_windows_with_a_bar(tmp_path, capsys):
    """Running a written model in its consumer, window by window, shows a bar (stderr); progress=False shows none."""
    from layerwise.quant.hf import transformers_nll

    from .conftest import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "m")
    ids = _split_windows().evaluation
    for progress in (True, False):
        capsys.readouterr()
        nll = transformers_nll(tmp_path / "m", ids, progress=progress)
        err = capsys.readouterr().err
        assert len(nll) == ids.shape[0] and ("transformers perplexity: 100%" in err) == progress, err


def test_ties_keep_the_named_groups_together_and_split_the_rest():
    """``--tie gate,up`` keeps each block's gate and up in one group and types every other map alone; a tie that is
    not a whole group of maps that run together is refused in one line."""
    from .conftest import tiny_lm

    an = tiny_lm("llama").anatomy
    tied = an.ties(("gate", "up"))
    assert tied == ("mlp.gate_up",) and an.ties(("q", "k", "v", "gate", "up")) == ("attn.qkv", "mlp.gate_up")
    names = [g for g, _ in an.quant_groups(1, fused=tied)]
    assert names == [
        "L1.attn.q_proj",
        "L1.attn.k_proj",
        "L1.attn.v_proj",
        "L1.attn.o_proj",
        "L1.mlp.gate_up",
        "L1.mlp.down_proj",
    ]
    assert [g for g, _ in an.quant_groups(1, fused=())] == [g for g, _ in an.quant_groups(1, fused=False)]
    with pytest.raises(
        LayerwiseError,
        match=r"^`tie` names maps that run together.*\(q,k,v or gate,up for llama\); "
        r"q,k is not such a group$",
    ):
        an.ties(("q", "k"))


class _Twinned:
    """Integer candidates that declare their third config a twin of the second (as llama.cpp's fallback types are),
    though the two differ: a measurement that copies the record instead of measuring it shows here."""

    def __init__(self):
        from layerwise.quant.measure import GroupCandidates

        self.inner = GroupCandidates(SMALL)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def twins(self, paths):
        return {SMALL[2].name: SMALL[1].name}


@pytest.mark.parametrize("offload", [None, "disk"])
def test_twins_are_measured_once_and_share_the_record(offload, tmp_path):
    """A config that stores a group as an earlier one does gets that one's record, in memory and from disk; the
    others are measured as before."""
    from layerwise import load
    from layerwise.quant.measure import measure

    from .conftest import tiny_lm, tiny_windows

    lm, w = tiny_lm("llama", layers=2), tiny_windows(2)
    plain = measure(lm, w, candidates=SMALL, progress=False)
    if offload:
        lm.model.save_pretrained(tmp_path / "m")
        lm = load(str(tmp_path / "m"), offload="disk")
    twinned = measure(lm, w, candidates=_Twinned(), progress=False)
    a, b, c = (cfg.name for cfg in SMALL)
    for g, entry in twinned.groups.items():
        assert list(entry["configs"]) == [a, b, c]
        assert entry["configs"][c] == entry["configs"][b]
        assert plain.groups[g]["configs"][c]["err"] < entry["configs"][c]["err"]  # the copy, not a measurement
        for name in (a, b):
            assert entry["configs"][name]["err"] == pytest.approx(plain.groups[g]["configs"][name]["err"], rel=1e-6)


def test_gguf_candidate_types_and_what_needs_an_importance_matrix():
    """Without an importance matrix the K- and legacy types; with one, the IQ types too; cheapest first. Asking for a
    type llama.cpp only makes with a matrix, without one, or for an unknown type, is one clear error."""
    from layerwise.quant.gguf import IQ_TYPES, TYPES, candidate_types

    assert candidate_types(None, None) == TYPES
    both = candidate_types(None, object())  # type: ignore[arg-type]
    assert set(both) == set(TYPES + IQ_TYPES) and both[:3] == ("IQ1_S", "IQ1_M", "IQ2_XXS") and both[-1] == "Q8_0"
    assert candidate_types(("q4_k", "IQ4_XS", "Q4_K"), None) == ("IQ4_XS", "Q4_K")
    with pytest.raises(LayerwiseError, match=r"makes IQ1_S, IQ2_XXS only with an importance matrix: give `imatrix`"):
        candidate_types(("IQ2_XXS", "Q4_K", "IQ1_S"), None)
    with pytest.raises(LayerwiseError, match="unknown GGUF type 'Q9_K' in `types`"):
        candidate_types(("Q9_K",), None)
