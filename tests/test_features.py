"""Per-example readouts: where they read, padding, and bad input."""

import pytest
import torch

from layerwise.errors import LayerwiseError
from layerwise.features import check_fits, collect_ids, unit_list

from .conftest import tiny_lm


def _seqs():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7)]


def test_block_output_is_hidden_states_k_plus_1(arch):
    """L{k} is block k's output: output_hidden_states[k + 1] for every block but the last (that entry is after the final
    norm)."""
    lm = tiny_lm(arch, layers=3)
    seqs = _seqs()
    f = collect_ids(lm, seqs, units="all", read="last", batch_size=2)
    for j, s in enumerate(seqs):
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states
        for k in range(2):
            torch.testing.assert_close(f.values[f"L{k}"][j], hs[k + 1][0, -1], rtol=1e-4, atol=1e-5)
        # the last entry is normed, so it is not block 2's raw output; ours is h_2 + a_2 + m_2
        assert not torch.allclose(f.values["L2"][j], hs[3][0, -1], atol=1e-3)
        torch.testing.assert_close(
            f.values["L2"][j], f.values["L1"][j] + f.values["L2.attn"][j] + f.values["L2.mlp"][j], rtol=1e-4, atol=1e-5
        )


def test_mean_read_and_padding_invariance():
    """A batch of ragged examples reads exactly what each example gives alone; mean skips a leading BOS when asked."""
    lm = tiny_lm("llama")
    seqs = _seqs()
    batched = collect_ids(lm, seqs, read="mean", skip_first=True, batch_size=5)
    for j, s in enumerate(seqs):
        alone = collect_ids(lm, [s], read="mean", skip_first=True, batch_size=1)
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(alone.values["L0"][0], hs[1][0, 1:].mean(0), rtol=1e-4, atol=1e-5)
        for u in batched.units:
            torch.testing.assert_close(batched.values[u][j], alone.values[u][0], rtol=1e-4, atol=1e-5)
    assert batched.n_tokens.tolist() == [len(s) for s in seqs]


def test_model_is_left_unchanged_and_hooks_removed():
    lm = tiny_lm("qwen2")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    collect_ids(lm, _seqs(), units="all")
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_bad_input_is_one_clear_error():
    lm = tiny_lm("llama")
    with pytest.raises(LayerwiseError, match="units"):
        unit_list(lm.anatomy, "everything")
    with pytest.raises(LayerwiseError, match="out of range"):
        unit_list(lm.anatomy, ["L9"])
    with pytest.raises(LayerwiseError, match="read"):
        collect_ids(lm, _seqs(), read="max")  # type: ignore[arg-type]
    with pytest.raises(LayerwiseError, match="text token"):
        collect_ids(lm, [[1], []])
    with pytest.raises(LayerwiseError, match="context"):
        collect_ids(lm, [[1] * 200])
    with pytest.raises(LayerwiseError, match="fewer examples"):
        check_fits(10_000, 90, 576, max_bytes=1 << 20)
    assert check_fits(10, 3, 32, max_bytes=1 << 20) == 10 * 3 * 32 * 4
