"""layerwise tune on the default model (CPU): several strategies in one process, and one CLI run on chat data."""

from __future__ import annotations

import json

import pytest
import torch

from layerwise import load, tune
from layerwise.cli import main
from layerwise.errors import LayerwiseError

pytestmark = pytest.mark.real


def _train_nll(model, data: tune.TuneData) -> float:
    with torch.no_grad():
        return float(model(input_ids=data.ids, attention_mask=data.mask, labels=data.labels, use_cache=False).loss)


def test_strategies_lower_the_training_loss(real_cache):
    """Each strategy, per-block learning rates from a (cheap, block-influence) Profile, and bf16 (CPU; no CUDA here)."""
    from layerwise import profile

    lm = load("default", device="cpu")
    data = tune.tuning_data("builtin:pydoc", lm.tokenizer, seq_len=64, samples=2, eval_samples=2)
    snap = tune.Snapshot(list(lm.model.parameters()))
    before = _train_nll(lm.model, data)
    rates = tune.layer_rates(
        profile(lm, data.as_windows(), ablation="none", lens=False, progress=False), "bi", "block", 1.0
    )
    for select, lr, r_lr in (
        ("lisa", 2e-4, None),
        ("adaptive", 2e-4, None),
        ("lora", 1e-3, None),
        ("lisa", 2e-4, rates),
    ):
        snap.reset()
        r = tune.train(
            lm, data, select=select, active=2, interval=1, steps=2, lr=lr, batch_size=2, progress=False, rates=r_lr
        )
        after = _train_nll(r.model, data)
        assert after < before - 0.01, f"{select}: {before:.4f} -> {after:.4f}"
        assert r.unit_lr == ({u: lr * w for u, w in rates.items()} if r_lr else {})
        s = r.summary()
        if (
            select == "lisa"
        ):  # 2 blocks + the tied embedding (counted once) + final norm; Adam keeps two moments of each
            emb = lm.model.model.embed_tokens.weight.numel()
            assert all(len(rec["active"]) == 2 for rec in r.records)
            assert (
                s["trainable_params_max"] < emb + 2 * 3.6e6
                and s["optimizer_state_bytes_max"] <= 8 * s["trainable_params_max"] + 64 * 100
            )
        if select == "lora":
            lm.model = r.model.unload()
    snap.reset()
    lm.model.to(torch.bfloat16)  # as load(dtype="bfloat16") gives it
    before = _train_nll(lm.model, data)
    tune.train(lm, data, select="lisa", active=2, interval=1, steps=2, lr=1e-3, batch_size=2, progress=False)
    after = _train_nll(lm.model, data)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16} and after < before - 0.01, (
        f"bf16: {before:.4f} -> {after:.4f}"
    )
    for unit in ("expert", "router"):  # a dense model has neither; refused before anything changes
        with pytest.raises(LayerwiseError, match=f"unit {unit} needs a mixture-of-experts model; this llama has no"):
            tune.train(lm, data, select="lisa", unit=unit, steps=1, progress=False)


def test_cli_chat_run_saves_a_model_that_reloads_and_generates(real_cache, tmp_path, capsys):
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM

    # Real chat data, by a fixed rule: the prompt names a pydoc topic, the response is the topic's first 200 characters.
    keys = sorted(topics)[:8]
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"What does the Python reference say about {k}?", "response": topics[k][:200]}) + "\n"
            for k in keys
        )
    )
    out = tmp_path / "run"
    rc = main(
        [
            "tune",
            "--data",
            str(path),
            "--select",
            "lisa",
            "--active",
            "2",
            "--interval",
            "1",
            "--steps",
            "2",
            "--seq-len",
            "64",
            "--samples",
            "6",
            "--eval-samples",
            "2",
            "--batch-size",
            "3",
            "--restore",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "tune.json").read_text())
    r = res["runs"][0]
    assert (
        res["meta"]["data"]["kind"] == "chat"
        and res["meta"]["model_hash"]
        and "layerwise tune" in res["meta"]["command"]
    )
    assert len(r["loss"]) == 2 and [len(x["active"]) for x in r["records"]] == [2, 2]
    ev = r["eval"]
    assert len(ev["restored_blocks"]) == 2 and set(ev["train"]) == set(ev["second"]) == {"tuned", "restored"}
    assert ev["second"]["tuned"]["n_windows"] == 2 and ev["diversity"]["tuned"]["n_prompts"] == 2
    assert (out / "report.html").read_text().count("<img") == 2
    model = AutoModelForCausalLM.from_pretrained(out / "model", use_safetensors=True)
    base = load("default", device="cpu").model
    for i in ev["restored_blocks"]:  # restored blocks are the base model's, bit for bit
        assert all(
            torch.equal(p, q) for p, q in zip(model.model.layers[i].parameters(), base.model.layers[i].parameters())
        )
    x = torch.tensor([[1, 2, 3]])
    assert model.generate(input_ids=x, max_new_tokens=4, do_sample=False).shape == (1, 7)
