"""llama.cpp's importance matrix: collected here, through llama-imatrix's GGUF file and back, and what it weighs."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from distill.compress.quant import imatrix, llama_quants
from distill.export.gguf import imatrix_modules, tensor_names
from tests.conftest import ROOT
from tests.helpers import tiny_llama

FIXTURES = ROOT / "tests" / "fixtures" / "llama_cpp_quants.npz"


def _batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (3, 16), generator=g), torch.randint(0, 512, (2, 16), generator=g)]


def test_imatrix_modules_are_what_llama_imatrix_collects():
    tied = tiny_llama(vocab_size=512)
    names = imatrix_modules(tied)
    assert len(names) == 2 * 7 and names["model.layers.1.mlp.down_proj"] == "blk.1.ffn_down.weight"
    assert names["model.layers.0.self_attn.q_proj"] == "blk.0.attn_q.weight"
    assert imatrix_modules(tied, output=True) == names  # a tied head is token_embd: never collected
    assert (
        "lm_head.weight" not in tensor_names(tied) and tensor_names(tied)["model.norm.weight"] == "output_norm.weight"
    )
    untied = tiny_llama(vocab_size=512, tie_word_embeddings=False)
    assert "lm_head" not in imatrix_modules(untied)
    assert imatrix_modules(untied, output=True)["lm_head"] == "output.weight"  # --process-output


def test_a_tiny_models_imatrix_round_trips_through_imatrix_gguf(tmp_path):
    model = tiny_llama(vocab_size=512).eval()
    names = imatrix_modules(model)
    batches = _batches()
    found = imatrix.collect(model, list(names), batches, "tiny text")
    # An independent sum of squared inputs over every token, for one projection.
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    hook.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    np.testing.assert_allclose(found.sums["model.layers.1.mlp.down_proj"], x.pow(2).sum(0).numpy(), rtol=1e-6)
    assert set(found.counts.values()) == {5 * 16} and (found.chunk_size, found.chunk_count) == (16, 5)
    assert found.sums["model.layers.0.mlp.up_proj"].dtype == np.float32

    path = imatrix.write(tmp_path / "imatrix.gguf", found, names)
    back = imatrix.read(path, names)
    assert back.counts == found.counts and back.datasets == ("tiny text",)
    assert (back.chunk_size, back.chunk_count) == (16, 5)
    assert back.sums.keys() == found.sums.keys()
    assert all(np.array_equal(back.sums[m], found.sums[m]) for m in names)
    for m in names:  # what llama-quantize weighs by: sums / count in fp32
        assert np.array_equal(back.importance(m), found.sums[m] / np.float32(80))

    # The file as llama.cpp's loader reads it: F32 <tensor>.in_sum2 (columns x 1), then .counts (1 x 1), by name.
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents() == ["tiny text"]
    assert reader.get_field("imatrix.chunk_count").contents() == 5
    assert reader.get_field("imatrix.chunk_size").contents() == 16
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == [n + s for n in sorted(names.values()) for s in (".in_sum2", ".counts")]
    sums, counts = tensors["blk.1.ffn_down.weight.in_sum2"], tensors["blk.1.ffn_down.weight.counts"]
    assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(sums.shape) == [128, 1] and list(counts.shape) == [1, 1] and float(counts.data[0, 0]) == 80.0


def test_reading_keeps_the_models_entries_and_refuses_what_is_not_an_imatrix(tmp_path):
    model = tiny_llama(vocab_size=512).eval()
    names = imatrix_modules(model)
    path = imatrix.write(tmp_path / "i.gguf", imatrix.collect(model, list(names), _batches()), names)
    part = {m: n for m, n in names.items() if ".layers.0." in m}  # a model with other tensors skips the rest
    assert imatrix.read(path, part).sums.keys() == part.keys()
    assert imatrix.read(path, names).datasets == ()  # none named: llama.cpp's key holds [""]
    other = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(other, "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"holds no <tensor>.in_sum2 / .counts pairs: not an imatrix.gguf file"):
        imatrix.read(other, names)
    with pytest.raises(ValueError, match=r"llama-imatrix collects the inputs of matrix multiplications"):
        imatrix.collect(model, ["model.embed_tokens"], _batches())


@pytest.mark.parametrize("kind", ["q2_k", "q5_0", "q5_1", "q4_0", "q4_1"])
def test_importance_lowers_the_importance_weighted_error_of_llama_cpps_types(kind):
    with np.load(FIXTURES) as data:
        # Not Q4_1 on the teacher's row: it is stored in Q4_1, which both roundings give back exactly.
        for name in ("normal", "outliers", "edge", *(("teacher_down_proj",) if kind != "q4_1" else ())):
            x, importance = data[f"{name}.x"], data[f"{name}.importance"]
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            plain, weighted = (gguf.quants.dequantize(data[f"{name}.{kind}{s}"], qtype) for s in ("", ".imatrix"))
            err = {k: float((importance * (v - x) ** 2).sum()) for k, v in (("plain", plain), ("imatrix", weighted))}
            assert err["imatrix"] < err["plain"], (name, err)


def test_a_collected_imatrix_lowers_each_types_weighted_error_on_a_models_weights():
    model = tiny_llama(vocab_size=512, intermediate_size=256).eval()  # down_proj rows 256 wide: the K-quants fit
    names = imatrix_modules(model)
    found = imatrix.collect(model, list(names), _batches())
    for kind in ("iq4_nl", "q4_0", "q5_0", "q2_k", "q3_k", "q4_k"):
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        err = {"plain": 0.0, "imatrix": 0.0}
        for module in names:
            w = model.get_submodule(module).weight.detach().numpy()
            if w.shape[1] % llama_quants.BLOCKS[kind]:
                continue
            v = found.importance(module)
            for label, qw in (("plain", None), ("imatrix", v)):
                q = gguf.quants.dequantize(llama_quants.quantize(w, kind, qw), qtype)
                err[label] += float((v * (q - w) ** 2).sum())
        assert 0 < err["imatrix"] < err["plain"], (kind, err)
