"""Layer-selective tuning on tiny models: exactly which parameters change, optimizer memory, the Trainer callback."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerControl, TrainerState

from layerwise import tune
from layerwise.errors import LayerwiseError
from layerwise.profile import Profile, Unit

from .conftest import records_peak, tiny_lm, tiny_windows

LAYERS = 4


def _profile(lm, metric: str = "ablate_nll") -> Profile:
    """A profile whose importance grows with depth (L3 most important)."""
    units = [Unit(f"L{i}", i, "block", {metric: float(i + 1)}) for i in range(LAYERS)]
    return Profile(meta={"model_hash": lm.source["model_hash"], "n_layers": LAYERS}, units=units)


def _setup(select: str, *, active: int = 2, interval: int = 2, train_embeddings: bool = True, lm=None):
    lm = lm or tiny_lm("llama", LAYERS)
    weights = (
        tune.importance_weights(_profile(lm), "ablate_nll", "block")
        if select.startswith(("importance", "top"))
        else None
    )
    sel = tune.LayerSelector(select, "block", active, interval, 1.0, weights, seed=1, train_embeddings=train_embeddings)
    lm.model.requires_grad_(True)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-2)
    sel.on_train_begin(None, TrainerState(), TrainerControl(), model=lm.model, optimizer=opt)
    return lm, sel, opt


def _step(lm, sel, opt, step: int, ids: torch.Tensor) -> dict[str, bool]:
    """One optimizer step driven through the callback events; returns which parameters changed."""
    state = TrainerState(global_step=step)
    sel.on_step_begin(None, state, TrainerControl(), optimizer=opt)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    lm.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    trainable = {id(p) for p in lm.model.parameters() if p.requires_grad}
    for n, p in lm.model.named_parameters():
        assert (p.grad is not None) == (id(p) in trainable), (
            f"{n}: a frozen parameter got a gradient or a trained one none"
        )
    sel.on_pre_optimizer_step(None, state, TrainerControl())
    opt.step()
    sel.on_optimizer_step(None, state, TrainerControl(), optimizer=opt)
    assert {id(p) for p in opt.state} <= trainable, "the optimizer holds state for a frozen parameter"
    opt.zero_grad(set_to_none=True)
    return {n: not torch.equal(p, before[n]) for n, p in lm.model.named_parameters()}


def _expected(lm, sel) -> set[str]:
    """Names of the parameters that must change: the active units' and the always-trained ones (tied: one name)."""
    ids = {id(p) for u in sel.current for p in sel.params[u]} | {id(p) for p in sel.always}
    return {n for n, p in lm.model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize(
    "select",
    [
        "full",
        "lisa",
        "importance:ablate_nll",
        "top:ablate_nll",
        "adaptive",
        "badam:ascending",
        "badam:descending",
        "badam:random",
    ],
)
def test_each_step_changes_exactly_the_active_units(select):
    lm, sel, opt = _setup(select)
    ids = tiny_windows(2, 12).ids
    seen = []
    for step in range(6):
        changed = _step(lm, sel, opt, step, ids)
        assert {n for n, c in changed.items() if c} == _expected(lm, sel)
        seen.append(tuple(sel.current))
    assert [r["active"] for r in sel.records] == [list(s) for s in seen]
    if select == "full":
        assert seen == [tuple(f"L{i}" for i in range(LAYERS))] * 6
    elif select == "top:ablate_nll":
        assert seen == [("L2", "L3")] * 6
    elif select == "badam:ascending":
        assert seen == [("L0", "L1")] * 2 + [("L2", "L3")] * 2 + [("L0", "L1")] * 2
    elif select == "badam:descending":
        assert seen == [("L2", "L3")] * 2 + [("L0", "L1")] * 2 + [("L2", "L3")] * 2
    else:  # re-drawn every interval of 2 steps, never within one
        assert all(len(s) == 2 for s in seen) and seen[0] == seen[1] and seen[2] == seen[3] and seen[4] == seen[5]


def test_frozen_embeddings_stay_and_tied_weights_count_once():
    lm = tiny_lm("llama", LAYERS)
    lm.model.config.tie_word_embeddings = True
    lm.model.tie_weights()
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    lm, sel, opt = _setup("lisa", active=1, lm=lm)
    assert len(sel.always) == 2  # the shared embedding/head tensor once, plus the final norm
    block = sum(p.numel() for p in sel.params[sel.current[0]])
    assert sel.trainable() == block + lm.model.model.embed_tokens.weight.numel() + lm.model.model.norm.weight.numel()
    lm, sel, opt = _setup("lisa", active=1, train_embeddings=False)
    changed = _step(lm, sel, opt, 0, tiny_windows(2, 12).ids)
    assert (
        not changed["model.embed_tokens.weight"] and not changed["lm_head.weight"] and not changed["model.norm.weight"]
    )
    assert sel.trainable() == sum(p.numel() for p in sel.params[sel.current[0]])


def test_state_freed_when_switched_off_and_reset_when_back():
    lm, sel, opt = _setup("badam:ascending", active=2, interval=1)
    ids = tiny_windows(2, 12).ids
    _step(lm, sel, opt, 0, ids)
    first = sel.params["L0"][0]
    assert opt.state[first]["step"] == 1
    _step(lm, sel, opt, 1, ids)  # L2, L3 now: L0's state is gone
    assert first not in opt.state and sel.records[1]["optimizer_state_bytes"] == tune.optimizer_state_bytes(opt)
    _step(lm, sel, opt, 2, ids)  # L0 back: its state starts again
    assert opt.state[first]["step"] == 1


def test_lisa_bug_impossible():
    """An optimizer built after freezing (the copied LISA bug) is refused; train() updates blocks first drawn late."""
    lm = tiny_lm("llama", LAYERS)
    for blk in lm.model.model.layers[1:]:
        blk.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=1e-2)
    sel = tune.LayerSelector("lisa", active=1, interval=1)
    with pytest.raises(LayerwiseError, match="optimizer was built without the parameters of 3 units"):
        sel.on_train_begin(None, TrainerState(), TrainerControl(), model=lm.model, optimizer=opt)
    start = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    run = tune.train(
        lm,
        tiny_windows(4, 12),
        select="badam:ascending",
        active=1,
        interval=2,
        steps=8,
        lr=1e-2,
        batch_size=2,
        progress=False,
    )
    assert [r["active"] for r in run.records] == [["L0"]] * 2 + [["L1"]] * 2 + [["L2"]] * 2 + [["L3"]] * 2
    for i in range(LAYERS):  # every block, even the last one switched on, was updated
        assert not torch.equal(
            lm.model.model.layers[i].mlp.down_proj.weight, start[f"model.layers.{i}.mlp.down_proj.weight"]
        )


def test_lora_trains_adapters_only_and_adaptive_over_lora_selects_blocks():
    lm = tiny_lm("llama", LAYERS)
    start = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    run = tune.train(lm, tiny_windows(4, 12), select="lora", steps=2, lr=1e-2, batch_size=2, progress=False)
    names = dict(run.model.named_parameters())
    changed = {
        n for n, p in names.items() if "lora_" in n and not torch.allclose(p, torch.zeros_like(p)) and "lora_B" in n
    }
    assert len(changed) == 7 * LAYERS  # every linear map of every block has a trained adapter
    base = run.model.unload()
    assert all(torch.equal(p, start[n]) for n, p in base.named_parameters())
    lm = tiny_lm("llama", LAYERS)
    run = tune.train(
        lm,
        tiny_windows(4, 12),
        select="adaptive",
        lora=True,
        active=1,
        interval=1,
        steps=3,
        lr=1e-2,
        batch_size=2,
        progress=False,
    )
    trained = {r["active"][0] for r in run.records}
    for i in range(LAYERS):
        b = [p for n, p in run.model.named_parameters() if f"layers.{i}." in n and "lora_B" in n]
        assert any(bool(p.abs().sum()) for p in b) == (f"L{i}" in trained)
    assert set(run.selector.scores) == trained and all(v > 0 for v in run.selector.scores.values())
    assert run.selector.always == []  # peft keeps embeddings frozen


def test_gradient_accumulation_matches_one_big_batch():
    ids = tiny_windows(4, 12)
    a, b = tiny_lm("llama", LAYERS), tiny_lm("llama", LAYERS)
    tune.train(a, ids, select="full", steps=1, lr=1e-2, batch_size=4, grad_accum=1, max_grad_norm=0, progress=False)
    tune.train(b, ids, select="full", steps=1, lr=1e-2, batch_size=2, grad_accum=2, max_grad_norm=0, progress=False)
    start = tiny_lm("llama", LAYERS).model
    for (n, p), q, s in zip(a.model.named_parameters(), b.model.parameters(), start.parameters()):
        # Adam's first step moves each weight by about lr = 1e-2; the two runs agree to a hundredth of that. Adam
        # divides each step by its gradient's size, so a gradient near zero, summed over two micro-batches in
        # another order, moves its weight by more than rounding: 2e-5 on one weight of 2048, measured
        assert (p - s).abs().max() > 5e-3 and torch.allclose(p, q, rtol=0, atol=1e-4), n


def _trainer(tmp_path, model, sel, steps: int, optimizer=None):
    from transformers import Trainer, TrainingArguments

    ds = [{"input_ids": x, "labels": x} for x in tiny_windows(8, 12).ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    return Trainer(model=model, args=args, train_dataset=ds, callbacks=[sel], optimizers=(optimizer, None))


@pytest.mark.parametrize("select", ["lisa", "adaptive"])
def test_callback_in_plain_trainer_and_resume_keeps_schedule(tmp_path, select):
    """The documented example: a LayerSelector in a plain HF Trainer; resuming from its checkpoint keeps the
    schedule."""
    model = tiny_lm("llama", LAYERS).model
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    sel = tune.LayerSelector(select, active=1, interval=2, seed=3)
    trainer = _trainer(tmp_path, model, sel, 4)
    trainer.train()
    live = {id(p) for p in sel.params[sel.current[0]]} | {id(p) for p in sel.always}
    assert trainer.optimizer.state and {id(p) for p in trainer.optimizer.state} <= live  # no state for frozen units
    first = [r["active"] for r in sel.records]
    assert len(first) == 4 and first[0] == first[1] and first[2] == first[3]
    trained = {u for a in first for u in a}
    for i in range(LAYERS):
        moved = not torch.equal(model.model.layers[i].mlp.up_proj.weight, start[f"model.layers.{i}.mlp.up_proj.weight"])
        assert moved == (f"L{i}" in trained)
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"][
        "LayerSelector"
    ]
    assert saved["attributes"]["current"] == first[1]
    again = tiny_lm("llama", LAYERS).model
    trainer = _trainer(tmp_path, again, tune.LayerSelector(select, active=1, interval=2, seed=3), 4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, tune.LayerSelector))
    assert [r["active"] for r in resumed.records] == first[2:]


def test_restoration_puts_blocks_back_and_snapshot_is_base():
    lm = tiny_lm("llama", LAYERS)
    snap = tune.Snapshot(list(lm.model.parameters()))
    start = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    run = tune.train(lm, tiny_windows(4, 12), select="full", steps=2, lr=1e-2, batch_size=2, progress=False)
    order = tune.restore_order(run.model, snap, "change")
    assert sorted(order) == list(range(LAYERS))
    with snap.swapped(tune.block_params(run.model, order[0])):
        for n, p in lm.model.model.layers[order[0]].named_parameters():
            assert torch.equal(p, start[f"model.layers.{order[0]}.{n}"])
    assert not torch.equal(
        lm.model.model.layers[order[0]].mlp.up_proj.weight, start[f"model.layers.{order[0]}.mlp.up_proj.weight"]
    )
    assert tune.restore_order(run.model, snap, "importance", {f"L{i}": float(i) for i in range(LAYERS)}) == list(
        range(LAYERS)
    )


def test_healing_a_dropped_checkpoint_keeps_its_layer_count(tmp_path):
    from layerwise import load
    from layerwise.drop import DropPlan, save_checkpoint

    lm = tiny_lm("llama", LAYERS)
    save_checkpoint(lm, DropPlan(["L1"], "block", "given"), tmp_path / "dropped")
    small = load(str(tmp_path / "dropped"), device="cpu")
    assert small.anatomy.n_layers == LAYERS - 1
    tune.train(
        small, tiny_windows(4, 12), select="lisa", active=1, interval=1, steps=2, lr=1e-2, batch_size=2, progress=False
    )
    tune.save_model(small.model, None, tmp_path / "healed")
    again = load(str(tmp_path / "healed"), device="cpu")
    assert again.anatomy.n_layers == LAYERS - 1
    assert torch.equal(again.model.model.layers[0].mlp.up_proj.weight, small.model.model.layers[0].mlp.up_proj.weight)


def test_bad_inputs_are_one_line_errors(tmp_path):
    lm = tiny_lm("llama", LAYERS)
    w = tiny_windows(4, 12)
    cases = [
        (dict(select="lisa2"), "unknown select 'lisa2'"),
        (dict(select="importance:nope"), "importance needs a Profile metric"),
        (dict(select="lisa", active=5), "active=5 is more than the 4 block units"),
        (dict(select="badam:sideways"), "unknown BAdam order"),
        (dict(select="top:ablate_nll"), "needs importance weights from a Profile"),
    ]
    for kw, msg in cases:
        with pytest.raises(LayerwiseError, match=msg) as e:
            tune.train(lm, w, steps=1, progress=False, **kw)
        assert "\n" not in str(e.value)
    lm.model.config.layerwise = {"dropped_sublayers": [f"L{i}.attn" for i in range(LAYERS)]}
    with pytest.raises(LayerwiseError, match="no trainable attn units left"):
        tune.train(lm, w, select="full", unit="attn", steps=1, progress=False)
    del lm.model.config.layerwise
    other = _profile(lm)
    other.meta["model_hash"] = "another"
    with pytest.raises(LayerwiseError, match="measured on another model"):
        tune.run(lm, tune.TuneData.from_windows(w), select=["top:ablate_nll"], prof=other, progress=False)
    with pytest.raises(LayerwiseError, match=r"loss became NaN/inf at step 1; the weights after step 0 .* are in"):
        with torch.no_grad():
            lm.model.model.norm.weight.fill_(float("nan"))
        tune.train(lm, w, select="lisa", steps=2, checkpoint=tmp_path / "ckpt", progress=False)
    assert (tmp_path / "ckpt" / "config.json").exists() and not list(tmp_path.glob(".ckpt*"))


def test_chat_data_trains_on_response_tokens_only(tmp_path):
    """Chat JSONL: labels cover exactly the assistant turns; held-out conversations are the evaluation windows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "user", "assistant", ":", "hi", "there", "bye", "now", "|"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="|")
    t.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} | {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    path = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": "hi", "response": "there now"},
        {"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "hi"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows * 6) + "\n")
    d = tune.tuning_data(str(path), t, seq_len=16, samples=4, eval_samples=4)
    assert d.meta["kind"] == "chat" and d.ids.shape == (4, 16) and d.meta["n_heldout_examples"] == 8
    first = [vocab[x] for x in "user : hi | assistant : there now |".split()]
    assert d.ids[0, : len(first)].tolist() == first
    assert d.labels[0, : len(first)].tolist() == [-100] * 6 + first[6:]  # "there now |" only
    assert (d.labels[0, len(first) :] == -100).all() and d.mask[0].sum() == len(first)
    assert len(d.prompts) == 8 and d.prompts[0] == [{"role": "user", "content": "hi"}]
    with pytest.raises(LayerwiseError, match="leaves none held out"):
        tune.tuning_data(str(path), t, seq_len=16, samples=12)
    text = tmp_path / "notes.txt"
    text.write_text("hi there now bye " * 16)
    assert tune.tuning_data(str(text), t, seq_len=16, samples=3).eval_ids.shape == (1, 16)
    with pytest.raises(LayerwiseError, match="training takes them all; lower samples"):
        tune.tuning_data(str(text), t, seq_len=16, samples=4)


def test_run_evaluates_both_domains_and_report_rerenders(tmp_path):
    """run() on a tiny model: two strategies from the same start, restored variants, tune.json and a page
    `layerwise report` redraws."""
    from layerwise.cli import main
    from layerwise.data import Windows

    lm = tiny_lm("llama", LAYERS)
    w = tiny_windows(6, 12)
    data = tune.TuneData.from_windows(Windows(w.ids, 4, "random", "x", 72), eval_samples=2)
    start = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    rep = tune.run(
        lm,
        data,
        select=["lisa", "full"],
        second=tiny_windows(3, 12, seed=1).ids,
        restore=1,
        out=tmp_path,
        progress=False,
        active=1,
        interval=1,
        steps=2,
        lr=1e-2,
    )
    assert [r["key"] for r in rep.runs] == ["lisa", "full"] and rep.exports == {}
    full = rep.runs[1]["eval"]
    assert full["train"]["tuned"]["n_windows"] == 2 and full["second"]["tuned"]["n_windows"] == 3
    assert (
        full["train"]["tuned"]["ref_nll"] == rep.runs[0]["eval"]["train"]["tuned"]["ref_nll"]
    )  # both start from the base model
    assert len(full["restored_blocks"]) == 1 and full["second"]["restored"]["kl"] < full["second"]["tuned"]["kl"]
    assert rep.runs[0]["trainable_params_max"] < rep.runs[1]["trainable_params_max"]
    assert rep.runs[0]["optimizer_state_bytes_max"] < rep.runs[1]["optimizer_state_bytes_max"]
    assert records_peak(json.loads((tmp_path / "tune.json").read_text())["meta"])
    assert any(not torch.equal(p, start[n]) for n, p in lm.model.named_parameters())
    assert not (tmp_path / "report.html").exists()  # results are JSON; the report module renders the page
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("<img") == 2 and "full + restore" in page and "lisa + restore" in page
    best = max(rep.runs, key=lambda r: -r["eval"]["train"]["tuned"]["delta_nll"])  # the summary opens the page
    top = page[: page.index("<img")]
    assert f"Best held-out gain: <code>{best['key']}</code>, {-best['eval']['train']['tuned']['delta_nll']:+.4f}" in top


def test_cli_unknown_select_is_one_line_before_loading(capsys):
    from layerwise.cli import main

    from .conftest import one_error_line

    assert main(["tune", "--select", "lisa,importance:zd", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "zd has no agreed direction" in err


@pytest.mark.parametrize("unit", ["attn", "mlp"])
def test_sublayer_units_train_their_branch_only(unit):
    """--unit attn|mlp: the active sublayers' weights change; the other branch and the block norms do not."""
    lm = tiny_lm("llama", LAYERS)
    sel = tune.LayerSelector("lisa", unit, 2, 1, seed=2)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-2)
    sel.on_train_begin(None, TrainerState(), TrainerControl(), model=lm.model, optimizer=opt)
    assert list(sel.params) == [f"L{i}.{unit}" for i in range(LAYERS)]
    for step in range(3):
        changed = _step(lm, sel, opt, step, tiny_windows(2, 12).ids)
        moved = {n for n, c in changed.items() if c}
        assert moved == _expected(lm, sel)
        branch = "self_attn" if unit == "attn" else "mlp"
        assert all(f".{branch}." in n for n in moved if ".layers." in n) and not any("layernorm" in n for n in moved)


# ---------------------------------------------------------------- per-unit learning rates, bf16


def _moved(before: dict[str, torch.Tensor], lm, params) -> float:
    """The largest change of any element of these parameters (AdamW's first step moves the largest-gradient one by
    lr)."""
    names = {id(p): n for n, p in lm.model.named_parameters()}
    return max(float((p.detach() - before[names[id(p)]]).abs().max()) for p in params)


def test_layer_rates_follow_the_profile_and_sit_in_the_optimizer_groups():
    """Hand computation from the Profile's values 1, 2, 3, 4 (L0..L3), and the rates read back after LISA switching."""
    lm = tiny_lm("llama", LAYERS)
    prof = _profile(lm)
    assert tune.layer_rates(prof, "ablate_nll", "block", 1.0) == pytest.approx(
        {"L0": 0.4, "L1": 0.8, "L2": 1.2, "L3": 1.6}, rel=1e-12
    )
    inv = 1 / (1 + 1 / 2 + 1 / 3 + 1 / 4) * 4  # τ = -1: w ∝ 1/importance, mean 1
    assert tune.layer_rates(prof, "ablate_nll", "block", -1.0) == pytest.approx(
        {f"L{i}": inv / (i + 1) for i in range(LAYERS)}, rel=1e-12
    )
    prof.units[0].metrics["ablate_nll"] = -1.0  # removal helped: floored at 1% of the largest (0.04)
    assert tune.layer_rates(prof, "ablate_nll", "block", 1.0) == pytest.approx(
        {k: v / (9.04 / 4) for k, v in {"L0": 0.04, "L1": 2.0, "L2": 3.0, "L3": 4.0}.items()}, rel=1e-12
    )
    data = tune.TuneData.from_windows(tiny_windows(6, 12), eval_samples=2)
    rep = tune.run(
        lm,
        data,
        select=["lisa", "top:ablate_nll"],
        prof=_profile(lm),
        layer_lr="ablate_nll:1",
        progress=False,
        active=2,
        interval=1,
        steps=3,
        lr=1e-2,
    )
    for r in rep.runs:
        assert r["key"].endswith("+layer_lr:ablate_nll:1") and r["layer_lr"] == "ablate_nll:1"
        assert r["unit_lr"] == pytest.approx({"L0": 4e-3, "L1": 8e-3, "L2": 1.2e-2, "L3": 1.6e-2}, rel=1e-12)
    from layerwise.report.tune import render

    page = render(rep)
    assert page.count("<h2>Per-unit learning rates</h2>") == 1 and "L0 0.004, L1 0.008, L2 0.012, L3 0.016" in page
    run = tune.train(
        lm,
        data,
        select="lisa",
        lora=True,
        active=1,
        interval=1,
        steps=2,
        lr=1e-2,
        rates={f"L{i}": 0.5 * i for i in range(LAYERS)},
        progress=False,
    )
    assert run.unit_lr == pytest.approx(
        {f"L{i}": 5e-3 * i for i in range(LAYERS)}, rel=1e-12
    )  # over LoRA: the units' adapters


def test_a_unit_at_twice_the_rate_moves_twice_as_far():
    """AdamW's first step on fresh state moves each parameter's largest-gradient element by exactly its group's lr;
    under LISA every (re)activated unit starts from fresh state, so the check holds at each switch."""
    lm = tiny_lm("llama", LAYERS)
    rates = {"L0": 2.0, "L1": 1.0, "L2": 0.5, "L3": 0.5}
    sel = tune.LayerSelector("lisa", "block", 2, 1, seed=3)
    lm.model.requires_grad_(True)
    opt = torch.optim.AdamW(sel.param_groups(lm.model, 1e-2, rates), lr=1e-2, weight_decay=0.0)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [
        ("L0", 2e-2),
        ("L1", 1e-2),
        ("L2", 5e-3),
        ("L3", 5e-3),
        ("rest", 1e-2),
    ]
    sel.on_train_begin(None, TrainerState(), TrainerControl(), model=lm.model, optimizer=opt)
    ids, prev, fresh_seen = tiny_windows(2, 12).ids, set(), set()
    for step in range(6):
        before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        _step(lm, sel, opt, step, ids)
        for u in set(sel.current) - prev:
            assert _moved(before, lm, sel.params[u]) == pytest.approx(1e-2 * rates[u], rel=1e-3)
            fresh_seen.add(u)
        if step == 0:
            assert _moved(before, lm, sel.always) == pytest.approx(1e-2, rel=1e-3)
        prev = set(sel.current)
    assert {"L0", "L1"} & fresh_seen and {"L2", "L3"} & fresh_seen  # both a fast and a slow unit were checked
    assert [g["lr"] for g in opt.param_groups] == [2e-2, 1e-2, 5e-3, 5e-3, 1e-2]


def test_layer_lr_bad_inputs_are_one_line_errors(capsys):
    from layerwise.cli import main

    from .conftest import one_error_line

    for text, msg in (
        ("nope", "layer_lr needs METRIC"),
        ("zd", "layer_lr needs METRIC"),
        ("ablate_nll:x", "exponent TAU must be a finite number"),
        ("ablate_nll:inf", "exponent TAU must be a finite number"),
    ):
        with pytest.raises(LayerwiseError, match=msg) as e:
            tune.parse_layer_lr(text)
        assert "\n" not in str(e.value)
    assert tune.parse_layer_lr("bi") == ("bi", 1.0) and tune.parse_layer_lr("ablate_nll:-0.5") == ("ablate_nll", -0.5)
    lm = tiny_lm("llama", LAYERS)
    data = tune.TuneData.from_windows(tiny_windows(4, 12), eval_samples=2)
    other = _profile(lm)
    other.meta["model_hash"] = "another"
    with pytest.raises(LayerwiseError, match="measured on another model"):
        tune.run(lm, data, select=["lisa"], prof=other, layer_lr="ablate_nll", progress=False)
    with pytest.raises(LayerwiseError, match="ranking units by ablate_nll .* needs a Profile of this model: pass prof"):
        tune.run(lm, data, select=["lisa"], layer_lr="ablate_nll", progress=False)
    with pytest.raises(LayerwiseError, match=r"the layer rates lack 1 block units of this model \(e.g. L3\)"):
        tune.train(lm, data, select="lisa", steps=1, rates={"L0": 1.0, "L1": 1.0, "L2": 1.0}, progress=False)
    assert main(["tune", "--layer-lr", "ablate_nll:fast", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "exponent TAU must be a finite number" in err


def test_bf16_model_trains_and_saves_in_bf16(tmp_path):
    """CPU check of the bf16 path (no CUDA here): a model loaded in bf16 trains in bf16, its loss falls, the checkpoint
    is bf16."""
    from safetensors import safe_open

    lm = tiny_lm("llama", LAYERS)
    lm.model.to(torch.bfloat16)
    w = tiny_windows(4, 12)
    run = tune.train(lm, w, select="lisa", active=2, interval=1, steps=6, lr=1e-2, batch_size=4, progress=False)
    assert run.losses[-1] < run.losses[0] - 0.1, run.losses
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    tune.save_model(lm.model, None, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg.get("dtype") or cfg.get("torch_dtype")) == "bfloat16"


def test_max_active_keeps_optimizer_state_within_the_share_of_full():
    """Counted as the selector counts: k blocks + embeddings/norm/head against everything; checked against real runs'
    state bytes."""
    lm = tiny_lm("llama", LAYERS)
    k = tune.max_active(lm.model, share=0.5)
    block = sum(p.numel() for p in lm.model.model.layers[0].parameters())
    fixed = sum(
        p.numel()
        for p in {
            id(p): p
            for m in (lm.model.model.embed_tokens, lm.model.model.norm, lm.model.lm_head)
            for p in m.parameters()
        }.values()
    )
    total = sum(p.numel() for p in lm.model.parameters())
    assert fixed + k * block <= total / 2 < fixed + (k + 1) * block
    w = tiny_windows(4, 12)
    full = tune.train(lm, w, select="full", steps=1, progress=False).summary()["optimizer_state_bytes_max"]
    sel = tune.train(lm, w, select="lisa", active=k, interval=1, steps=2, progress=False).summary()[
        "optimizer_state_bytes_max"
    ]
    assert sel <= full / 2 and full == 8 * total + 4 * len(
        list(lm.model.parameters())
    )  # two moments + a step count per tensor
    assert tune.max_active(lm.model, share=1.0) == LAYERS
    with pytest.raises(LayerwiseError, match="not even one block unit fits"):
        tune.max_active(lm.model, share=0.01)


def test_layer_rates_in_a_plain_trainer(tmp_path):
    """The README's recipe: the Trainer's optimizer built from the selector's groups keeps each unit's rate through LISA
    switches."""
    model = tiny_lm("llama", LAYERS).model
    sel = tune.LayerSelector("lisa", active=1, interval=1, seed=3)
    rates = {"L0": 2.0, "L1": 1.0, "L2": 0.5, "L3": 0.5}
    trainer = _trainer(tmp_path, model, sel, 3, torch.optim.AdamW(sel.param_groups(model, 1e-2, rates), lr=1e-2))
    trainer.train()
    assert len({tuple(r["active"]) for r in sel.records}) > 1
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups} == {
        "L0": 2e-2,
        "L1": 1e-2,
        "L2": 5e-3,
        "L3": 5e-3,
        "rest": 1e-2,
    }


def test_evaluation_after_training_shows_progress(capsys):
    """Each held-out pass after training shows a bar (stderr), named for the strategy and the corpus; progress=False
    (the CLI's --json) shows none."""
    from layerwise.data import Windows

    data = tune.TuneData.from_windows(Windows(tiny_windows(6, 12).ids, 4, "random", "x", 72), eval_samples=2)
    bars = ("evaluate full on train", "evaluate full on second")
    for progress in (True, False):
        capsys.readouterr()
        tune.run(
            tiny_lm("llama", LAYERS),
            data,
            select=["full"],
            second=tiny_windows(3, 12, seed=1).ids,
            progress=progress,
            steps=1,
            lr=1e-2,
        )
        err = capsys.readouterr().err
        if progress:
            assert all(f"{bar}: 100%" in err for bar in bars), err
        else:
            assert "%|" not in err and not any(bar in err for bar in bars), err
