"""llama.cpp's importance matrix: made as a streamed statistic (in memory and block by block from disk alike), written
in the GGUF format llama.cpp's own reader takes, read in that format and the legacy one, and refused in one line
when it is cut short or made for another model."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from layerwise import ggufio, load
from layerwise.anatomy import Anatomy
from layerwise.errors import LayerwiseError
from layerwise.loading import LoadedModel
from layerwise.quant.imatrix import Imatrix, compute, tensor_columns

from .conftest import moe_gguf, sparse_inputs, tiny_lm, tiny_windows


def _names(n_layers: int) -> list[str]:
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    return [f"blk.{i}.{k}.weight" for i in range(n_layers) for k in kinds]


def test_imatrix_sums_each_columns_squared_inputs_in_memory_and_from_disk(tmp_path):
    """Each entry is the sum over every calibration token of its matrix's squared inputs: block 0's q, k and v read
    the normed embeddings, gate and up one input; the count is the number of tokens; from disk, the same sums."""
    lm, w = tiny_lm("llama", layers=2), tiny_windows(5)
    w.n_calib = 4
    im = compute(lm, w, batch_size=3, dataset="tiny", progress=False)
    assert sorted(im.sums) == sorted(_names(2)) and im.chunk_count == 4 and im.chunk_size == w.seq_len
    assert all(c.tolist() == [4 * w.seq_len] for c in im.counts.values())
    layer = lm.model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(lm.model.model.embed_tokens(w.calibration))
    want = x.double().square().sum((0, 1)).numpy()
    for kind in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(im.sums[f"blk.0.{kind}.weight"][0], want, rtol=1e-5)
    np.testing.assert_array_equal(im.sums["blk.1.ffn_gate.weight"], im.sums["blk.1.ffn_up.weight"])
    assert im.sums["blk.1.ffn_down.weight"].shape == (1, lm.model.config.intermediate_size)
    lm.model.save_pretrained(tmp_path / "m")
    disk = compute(load(str(tmp_path / "m"), offload="disk", spill=tmp_path / "spill"), w, batch_size=2, progress=False)
    for name, sums in im.sums.items():
        np.testing.assert_allclose(disk.sums[name], sums, rtol=1e-6)
    assert not (tmp_path / "spill").exists()


def _llama_cpp_reads(path: Path) -> dict:
    """What llama.cpp's own GGUF reader (libggml's ``gguf_init_from_file``, which ``llama-quantize --imatrix`` uses)
    finds in ``path``: its keys' values and each tensor's type and size."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn, res, args in (
        ("gguf_get_n_tensors", i64, [ptr]),
        ("gguf_find_key", i64, [ptr, ctypes.c_char_p]),
        ("gguf_get_val_u32", ctypes.c_uint32, [ptr, i64]),
        ("gguf_get_val_str", ctypes.c_char_p, [ptr, i64]),
        ("gguf_get_arr_n", ctypes.c_size_t, [ptr, i64]),
        ("gguf_get_arr_str", ctypes.c_char_p, [ptr, i64, ctypes.c_size_t]),
        ("gguf_get_tensor_name", ctypes.c_char_p, [ptr, i64]),
        ("gguf_get_tensor_type", ctypes.c_int, [ptr, i64]),
        ("gguf_get_tensor_size", ctypes.c_size_t, [ptr, i64]),
        ("gguf_free", None, [ptr]),
    ):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx, "llama.cpp could not read the file"
    try:
        key = lambda k: lib.gguf_find_key(ctx, k.encode())  # noqa: E731
        datasets = key("imatrix.datasets")
        return {
            "type": lib.gguf_get_val_str(ctx, key("general.type")).decode(),
            "chunk_count": lib.gguf_get_val_u32(ctx, key("imatrix.chunk_count")),
            "chunk_size": lib.gguf_get_val_u32(ctx, key("imatrix.chunk_size")),
            "datasets": [
                lib.gguf_get_arr_str(ctx, datasets, i).decode() for i in range(lib.gguf_get_arr_n(ctx, datasets))
            ],
            "tensors": {
                lib.gguf_get_tensor_name(ctx, i).decode(): (
                    lib.gguf_get_tensor_type(ctx, i),
                    lib.gguf_get_tensor_size(ctx, i),
                )
                for i in range(lib.gguf_get_n_tensors(ctx))
            },
        }
    finally:
        lib.gguf_free(ctx)


def test_imatrix_file_is_what_llama_cpp_reads_and_loads_back(tmp_path):
    """The file holds what llama-quantize's loader asks for, as llama.cpp's reader sees it: general.type imatrix,
    the datasets, chunk count and size, and per matrix an F32 ``in_sum2`` of its columns and an F32 ``counts``;
    loaded back, every sum, count and importance is the same."""
    lm, w = tiny_lm("llama", layers=2), tiny_windows(4)
    w.n_calib = 3
    im = compute(lm, w, batch_size=2, dataset="builtin:pydoc", progress=False)
    path = im.save(tmp_path / "imatrix.gguf")
    seen = _llama_cpp_reads(path)
    assert seen["type"] == "imatrix" and seen["datasets"] == ["builtin:pydoc"]
    assert (seen["chunk_count"], seen["chunk_size"]) == (3, w.seq_len)
    hidden, mlp = lm.model.config.hidden_size, lm.model.config.intermediate_size
    for name in _names(2):
        cols = mlp if "ffn_down" in name else hidden
        assert seen["tensors"][f"{name}.in_sum2"] == (0, 4 * cols) and seen["tensors"][f"{name}.counts"] == (0, 4)
    assert len(seen["tensors"]) == 2 * len(_names(2))
    again = Imatrix.load(path)
    assert again.digest == im.digest and again.meta["model_hash"] == lm.source["model_hash"]
    for name in im.sums:
        np.testing.assert_allclose(again.sums[name], im.sums[name], rtol=1e-6)
        assert again.counts[name].tolist() == im.counts[name].tolist()
    again.check(tensor_columns(lm), "again")


def _legacy(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunks: int = 7, dataset: str = "wiki.txt") -> Path:
    """A file in llama.cpp's legacy format: entry count; per entry name, call count, values; last chunk, dataset."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    path.write_bytes(out + struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode())
    return path


def test_legacy_imatrix_reads_as_llama_quantize_reads_it(tmp_path):
    """A legacy .dat file's values are mean squares times the call count: the importance is them over the calls; a
    GGUF file's is the sums over the counts, and 1 where a matrix saw no token."""
    mean = np.array([0.5, 2.0, 4.0], dtype=np.float32)
    im = Imatrix.load(_legacy(tmp_path / "old.dat", {"blk.0.attn_q.weight": (4, mean * 4)}))
    assert im.legacy and im.chunk_count == 7 and im.datasets == ["wiki.txt"]
    np.testing.assert_allclose(im.importance()["blk.0.attn_q.weight"], mean)
    fresh = Imatrix({"e": np.array([[2.0, 4.0], [1.0, 1.0]])}, {"e": np.array([2.0, 0.0])})
    np.testing.assert_allclose(fresh.importance()["e"], [1.0, 2.0, 1.0, 1.0])
    back = Imatrix.load(im.save(tmp_path / "new.gguf"))  # a legacy matrix saved as GGUF: the same importance
    np.testing.assert_allclose(back.importance()["blk.0.attn_q.weight"], mean)


def test_bad_imatrix_files_are_refused_in_one_line(tmp_path):
    lm, w = tiny_lm("llama", layers=2), tiny_windows(3)
    w.n_calib = 2
    good = compute(lm, w, progress=False).save(tmp_path / "good.gguf")
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    old = _legacy(tmp_path / "old.dat", {"blk.0.attn_q.weight": (2, np.ones(8))})
    cut_old = tmp_path / "cut.dat"
    cut_old.write_bytes(old.read_bytes()[:20])
    import gguf

    model = gguf.GGUFWriter(str(tmp_path / "model.gguf"), arch="llama")  # a GGUF file, but a model's
    model.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    model.write_header_to_file()
    model.write_kv_data_to_file()
    model.write_tensors_to_file()
    model.close()
    for path, match in (
        (tmp_path / "model.gguf", "is a GGUF file but not an importance matrix"),
        (cut, "is not a readable importance matrix .* cut short"),
        (cut_old, "is not a readable importance matrix .* cut short"),
        (tmp_path / "missing.gguf", "cannot read the importance matrix .* check the path"),
    ):
        with pytest.raises(LayerwiseError, match=match) as err:
            Imatrix.load(path)
        assert "\n" not in str(err.value)
    other = tiny_lm("llama", layers=3)  # one block more: entries for a model it was not made for
    with pytest.raises(LayerwiseError, match=r"has no entry for blk\.2\.attn_q\.weight: it was made for another model"):
        Imatrix.load(good).check(tensor_columns(other), "good.gguf")
    with pytest.raises(LayerwiseError, match=r"gives blk\.0\.attn_q\.weight 8 columns, not .*another model"):
        Imatrix.load(old).check({"blk.0.attn_q.weight": lm.model.config.hidden_size}, "old.dat")


def _hidden(arch: str, experts, x: torch.Tensor, j: int) -> torch.Tensor:
    """Expert ``j``'s hidden activation (what its down matrix reads) for tokens ``x``, written out by hand."""
    if arch == "gpt_oss":  # (in, out) weights with biases; gate and up interleaved, clamped, a sigmoid gate
        gate_up = x @ experts.gate_up_proj[j] + experts.gate_up_proj_bias[j]
        gate, up = gate_up[..., ::2].clamp(max=experts.limit), gate_up[..., 1::2].clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    gate, up = (x @ experts.gate_up_proj[j].T).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_each_expert_s_matrix_sums_the_tokens_routed_to_it(arch):
    """A merged expert tensor has a matrix per expert, as llama-imatrix writes it: gate and up sum the squares of the
    tokens routed to the expert, down those of its hidden activation, each counting those tokens; the router and
    the shared experts' maps are matrices of their own over every token."""
    lm, w = tiny_lm(arch), tiny_windows(3)
    an = lm.anatomy
    im = compute(lm, w, batch_size=2, progress=False)
    assert lm.model.config._experts_implementation == "grouped_mm"  # put back after the pass
    im.check(tensor_columns(lm), "made")
    for i, x in sparse_inputs(lm, w.calibration).items():
        with torch.no_grad():
            _, _, idx = an.router(i)(x)
        name = f"blk.{i}.{{}}.weight".format
        np.testing.assert_allclose(im.sums[name("ffn_gate_inp")][0], x.double().square().sum(0), rtol=1e-5)
        assert im.counts[name("ffn_gate_inp")].tolist() == [len(x)]
        if arch == "qwen2_moe":
            assert im.counts[name("ffn_down_shexp")].tolist() == im.counts[name("ffn_gate_inp_shexp")].tolist()
        for j in range(4):
            mine = x[(idx == j).any(-1)]
            assert im.counts[name("ffn_down_exps")][j] == len(mine) == im.counts[name("ffn_gate_exps")][j]
            squares = mine.double().square().sum(0)
            for kind in ("ffn_gate_exps", "ffn_up_exps"):
                np.testing.assert_allclose(im.sums[name(kind)][j], squares, rtol=1e-5, atol=1e-9)
            with torch.no_grad():
                down = _hidden(arch, an.experts(i), mine, j).double().square().sum(0)
            np.testing.assert_allclose(im.sums[name("ffn_down_exps")][j], down, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_a_moe_imatrix_from_disk_equals_in_memory_and_llama_cpp_quantizes_with_it(arch, tmp_path):
    """A Qwen3-MoE or gpt-oss model read block by block from its GGUF file gives the matrix the model in memory
    gives, and llama.cpp quantizes that file with it (it checks every entry's size: a merged tensor's is experts ×
    columns), rounding the expert tensors otherwise than without it."""
    from layerwise.quant.gguf import llama_quantize

    model, path = moe_gguf(tmp_path / "moe.gguf", arch=arch)
    lm = LoadedModel(model=model, tokenizer=None, anatomy=Anatomy(model), source={"model_hash": "moe"})
    w = tiny_windows(4)
    im = compute(lm, w, batch_size=2, progress=False)
    disk = compute(load(str(path), offload="disk", spill=tmp_path / "spill"), w, batch_size=2, progress=False)
    assert sorted(disk.sums) == sorted(im.sums)
    for name, sums in im.sums.items():
        np.testing.assert_allclose(disk.sums[name], sums, rtol=1e-4, atol=1e-6)
        assert disk.counts[name].tolist() == im.counts[name].tolist()
    with_im = llama_quantize(path, tmp_path / "with.gguf", "Q4_0", imatrix=im)
    without = llama_quantize(path, tmp_path / "without.gguf", "Q4_0")
    (a,), (b,) = (
        [t.data for t in ggufio.reader(f).tensors if t.name == "blk.1.ffn_gate_exps.weight"] for f in (with_im, without)
    )
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_cli_makes_a_moe_imatrix_and_refuses_names_it_does_not_know(tmp_path, capsys):
    from layerwise.cli import main

    from .conftest import one_error_line, tiny_folder

    folder = tiny_folder(tmp_path / "olmoe", "olmoe", layers=2)
    args = ["imatrix", "--seq-len", "16", "--samples", "3"]
    assert main([*args, "--model", str(folder), "--out", str(tmp_path / "im")]) == 0
    im = Imatrix.load(tmp_path / "im" / "imatrix.gguf")
    assert im.sums["blk.1.ffn_down_exps.weight"].shape == (4, 64) and im.counts["blk.1.ffn_up_exps.weight"].sum() > 0
    deepseek = tiny_folder(tmp_path / "ds", "deepseek_v3", layers=2)
    assert main([*args, "--model", str(deepseek), "--out", str(tmp_path / "ds-im")]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err) and "llama.cpp splits deepseek_v3's self_attn.kv_b_proj into attn_k_b and" in err
    assert not (tmp_path / "ds-im" / "imatrix.gguf").exists()
