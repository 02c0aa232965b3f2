"""Training a mixture-of-experts model by expert or by router on tiny random configs: exactly the chosen experts'
slices of the shared expert tensors move, frozen experts get no gradient and no optimizer state, each expert's
gradient is its slice of the whole one, and the model (and any checkpoint written while training) is whole again."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

from layerwise import tune
from layerwise.cli import main
from layerwise.errors import LayerwiseError
from layerwise.profile import profile

from .conftest import MOE_ARCHS, one_error_line, tiny_folder, tiny_lm, tiny_windows


def _shared(lm) -> list[tuple[int, str]]:
    """(block, attribute) of every tensor a sparse block's experts share (weights, and biases where there are)."""
    an = lm.anatomy
    return [
        (i, name)
        for i in an.moe_layers
        for name, p in an.experts(i).named_parameters(recurse=False)
        if p.shape[0] == an.n_experts(i)
    ]


def _expert_slices(lm, shared) -> dict[tuple[int, int, str], torch.Tensor]:
    """Every expert's slice of every tensor its block's experts share, by (block, expert, attribute)."""
    an = lm.anatomy
    return {
        (i, j, name): getattr(an.experts(i), name)[j].detach().clone()
        for i, name in shared
        for j in range(an.n_experts(i))
    }


def _begin(lm, select: str, unit: str, active: int = 1, weights=None):
    sel = tune.LayerSelector(select, unit, active, 1, weights=weights, seed=3, train_embeddings=False)
    lm.model.requires_grad_(True)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-2, weight_decay=0.0)  # as tune.train builds it
    sel.on_train_begin(None, TrainerState(), TrainerControl(), model=lm.model, optimizer=opt)
    return sel, opt


def _step(lm, sel, opt, step: int, ids: torch.Tensor) -> None:
    state = TrainerState(global_step=step)
    sel.on_step_begin(None, state, TrainerControl(), optimizer=opt)
    lm.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    sel.on_pre_optimizer_step(None, state, TrainerControl())
    opt.step()
    sel.on_optimizer_step(None, state, TrainerControl(), optimizer=opt)
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_each_step_moves_exactly_the_active_expert_and_frees_the_others_state(arch):
    """BAdam over experts, one a step: the expert training moves in every tensor its block shares (weights and, for
    gpt-oss, biases), every other expert and every other weight stays bit for bit, only its slices hold a gradient
    and optimizer state; afterwards the model holds its own parameter objects again, named as before."""
    lm = tiny_lm(arch)
    names = [n for n, _ in lm.model.named_parameters()]
    objects = [id(p) for p in lm.model.parameters()]
    ids = tiny_windows(4, 16).ids
    shared = _shared(lm)
    assert len(shared) == len(lm.anatomy.moe_layers) * (4 if arch == "gpt_oss" else 2)
    with tune.expert_tensors(lm.model):
        sel, opt = _begin(lm, "badam:ascending", "expert")
        assert list(sel.params) == [f"L{i}.mlp.e{j}" for i in lm.anatomy.moe_layers for j in range(4)]
        trained = 0
        for step in range(3):
            before_slices = _expert_slices(lm, shared)
            before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if ".parametrizations." not in n}
            state = TrainerState(global_step=step)
            sel.on_step_begin(None, state, TrainerControl(), optimizer=opt)
            lm.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            (active,) = sel.current
            on = {id(p) for p in sel.params[active]}
            assert all((p.grad is not None) == (id(p) in on) for p in lm.model.parameters())
            layer, expert = int(active[1:].split(".")[0]), int(active.rsplit("e", 1)[1])
            mine = [name for i, name in shared if i == layer]  # the order of the expert's parameters
            routed = {name for name, p in zip(mine, sel.params[active], strict=True) if p.grad.any()}
            opt.step()
            assert {id(p) for p in opt.state} == on
            opt.zero_grad(set_to_none=True)
            moved = {k for k, v in _expert_slices(lm, shared).items() if not torch.equal(v, before_slices[k])}
            assert moved == {(layer, expert, name) for name in routed}  # an expert no token chose learns nothing
            trained += bool(moved)
            assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters() if n in before)
    assert trained >= 2
    assert [n for n, _ in lm.model.named_parameters()] == names and [id(p) for p in lm.model.parameters()] == objects


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_each_expert_s_gradient_is_its_slice_of_the_whole_gradient(arch):
    lm = tiny_lm(arch)
    ids = tiny_windows(2, 16).ids
    an = lm.anatomy
    layer = an.moe_layers[0]
    lm.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    whole = {n: p.grad.clone() for n, p in an.experts(layer).named_parameters()}
    lm.model.zero_grad(set_to_none=True)
    with tune.expert_tensors(lm.model):
        lm.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        parts = tune.part_params(lm.model, "expert")
        for j in range(4):
            got = [p.grad for p in parts[f"L{layer}.mlp.e{j}"]]
            assert len(got) == len(whole)
            for g, ref in zip(got, whole.values(), strict=True):
                torch.testing.assert_close(g, ref[j], rtol=1e-5, atol=1e-7)


def test_max_active_counts_experts_by_their_own_weights():
    """Full fine-tuning by expert trains every expert (embeddings frozen), so half its optimizer state is half of the
    experts, each counted by its own slices; the model is whole again afterwards."""
    lm = tiny_lm("mixtral")
    names = [n for n, _ in lm.model.named_parameters()]
    experts = 4 * len(lm.anatomy.moe_layers)
    assert tune.max_active(lm.model, "expert", share=0.5, train_embeddings=False) == experts // 2
    assert tune.max_active(lm.model, "expert", share=1.0, train_embeddings=False) == experts
    assert [n for n, _ in lm.model.named_parameters()] == names


def test_router_units_train_their_router_only():
    lm = tiny_lm("qwen2_moe")
    ids = tiny_windows(4, 16).ids
    sel, opt = _begin(lm, "lisa", "router")
    assert list(sel.params) == [f"L{i}.router" for i in lm.anatomy.moe_layers]
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    _step(lm, sel, opt, 0, ids)
    (active,) = sel.current
    router = {id(p) for p in lm.anatomy.router(int(active[1:].split(".")[0])).parameters()}
    moved = {id(p) for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == router


def test_importance_by_expert_ranks_the_profile_s_experts():
    """top:route_share trains the experts most tokens choose; an expert no token chose ranks by a share of 0."""
    lm, w = tiny_lm("olmoe"), tiny_windows(3)
    prof = profile(lm, w, ablation="none", lens=False, progress=False)
    weights = tune.importance_weights(prof, "route_share", "expert")
    assert list(weights) == [f"L{i}.mlp.e{j}" for i in lm.anatomy.moe_layers for j in range(4)]
    shares = {u: prof.unit(u).metrics["route_share"] for u in weights}
    with tune.expert_tensors(lm.model):
        sel, _ = _begin(lm, "top:route_share", "expert", active=2, weights=weights)
        best = sorted(shares, key=lambda u: -shares[u])[:2]
        assert sel.current == [u for u in weights if u in best]
    prof.unit("L1.mlp.e0").metrics.update(route_share=0.0, rel_update=None)
    assert tune.importance_weights(prof, "rel_update", "expert")["L1.mlp.e0"] == pytest.approx(
        1e-6 * max(tune.importance_weights(prof, "rel_update", "expert").values())
    )
    with pytest.raises(LayerwiseError, match=r"no ablate_kl values for expert units; re-profile with .*--expert-abl"):
        tune.importance_weights(prof, "ablate_kl", "expert")
    with pytest.raises(LayerwiseError, match="bi does not rank expert units; rank them by one of .*route_share"):
        tune.importance_weights(prof, "bi", "expert")
    with pytest.raises(LayerwiseError, match="does not rank router units; train them with full, lisa"):
        tune.importance_weights(prof, "route_share", "router")


def test_training_by_expert_saves_whole_checkpoints_during_and_after(tmp_path):
    """A checkpoint written while the experts are split (save_every) has the model's own tensor names and reloads in
    plain transformers with the trained weights; train() leaves the model whole, and only experts moved."""
    lm = tiny_lm("mixtral")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    run = tune.train(
        lm,
        tiny_windows(4, 16),
        select="lisa",
        unit="expert",
        active=2,
        steps=2,
        save_every=2,
        train_embeddings=False,
        checkpoint=tmp_path / "ckpt",
        progress=False,
    )
    assert run.records[-1]["active"] == run.selector.current and len(run.selector.current) == 2
    moved = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".experts." in n for n in moved)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert [n for n, _ in saved.named_parameters()] == [n for n, _ in lm.model.named_parameters()]
    for (n, p), q in zip(lm.model.named_parameters(), saved.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_expert_and_router_units_refuse_what_cannot_work_in_one_line(tmp_path, capsys):
    with pytest.raises(LayerwiseError, match="unit expert needs a mixture-of-experts model; this llama has no experts"):
        tune.train(tiny_lm("llama"), tiny_windows(2), unit="expert", steps=1, progress=False)
    with pytest.raises(LayerwiseError, match="unit router trains the routers' own weights, which LoRA adapters do not"):
        tune.train(tiny_lm("olmoe"), tiny_windows(2), unit="router", lora=True, steps=1, progress=False)
    lm = tiny_lm("olmoe")
    with pytest.raises(LayerwiseError, match=r"build the optimizer inside `with layerwise.tune.expert_tensors"):
        _begin(lm, "lisa", "expert")
    dense = str(tiny_folder(tmp_path / "dense", "llama"))
    assert main(["tune", "--model", dense, "--unit", "router", "--select", "top:bi", "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "unit router needs a mixture-of-experts model" in err


def test_cli_tunes_by_expert_and_writes_a_model_plain_transformers_loads(tmp_path):
    folder = tiny_folder(tmp_path / "moe", "olmoe")
    out = tmp_path / "run"
    args = [
        "tune",
        "--model",
        str(folder),
        "--unit",
        "expert",
        "--select",
        "badam:descending",
        "--active",
        "2",
        "--interval",
        "1",
    ]
    assert main([*args, "--steps", "2", "--samples", "6", "--seq-len", "16", "--out", str(out)]) == 0
    report = tune.TuneReport.load(out)
    (row,) = report.runs
    assert row["unit"] == "expert" and row["units"] == [f"L{i}.mlp.e{j}" for i in range(4) for j in range(4)]
    assert [rec["active"] for rec in row["records"]] == [["L3.mlp.e2", "L3.mlp.e3"], ["L3.mlp.e0", "L3.mlp.e1"]]
    assert (out / "report.html").exists()
    base = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
    tuned = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    assert list(tuned) == list(base)
    moved = {n for n, p in tuned.items() if not torch.equal(p, base[n])}
    assert moved <= {"model.layers.3.mlp.experts.gate_up_proj", "model.layers.3.mlp.experts.down_proj"} | {
        n for n in base if not n.startswith("model.layers.")
    }  # L3's experts, and the embeddings, final norm and head that train with every unit


def test_per_expert_learning_rates_come_from_the_profile():
    """layer_lr by expert: every expert its own AdamW group at lr × w, w ∝ route_share, mean 1 over the experts."""
    lm, w = tiny_lm("olmoe"), tiny_windows(4, 16)
    prof = profile(lm, w, ablation="none", lens=False, progress=False)
    rates = tune.layer_rates(prof, "route_share", "expert", 1.0)
    assert len(rates) == 4 * len(lm.anatomy.moe_layers) and sum(rates.values()) == pytest.approx(len(rates))
    run = tune.train(lm, w, select="lisa", unit="expert", steps=1, lr=1e-3, rates=rates, progress=False)
    assert run.unit_lr == pytest.approx({u: 1e-3 * r for u, r in rates.items()})
