"""The GGUF export: gguf-py's writer, llama.cpp's layout, reloaded through transformers' GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

from distill.compress.quant import schemes
from distill.compress.quant.gguf_grid import GGUFBlockFakeQuantizer, fake_quantize
from distill.compress.quant.gguf_grid import encode as encode_k
from distill.compress.quant.qat import convert, fake_quantized, prepare
from distill.config import ConfigError
from distill.export.formats import check_formats
from distill.export.gguf import file_name, rounded_copy, tensor_types, verify_gguf, write_gguf
from tests.conftest import CONF, ROOT
from tests.helpers import TINY_MODELS, tiny_llama
from train import train

QUIET = ["eval.max_batches=1", "eval.tasks=[]", "eval.new_tokens=0", "eval.speed_runs=0"]
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
QTYPES |= {k: gguf.GGMLQuantizationType[k.upper()] for k in ("q4_1", "q5_0", "q5_1")}


def _types(file: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(file).tensors}


@pytest.mark.parametrize("kind", ["q8_0", "q5_1", "q5_0", "q4_0", "q4_1"])
def test_fake_quant_grid_is_gguf_py_bit_for_bit_and_a_fixed_point_of_it(kind):
    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    w[0, :32] = 0  # an all-zero block: scale 0
    w[1, :32] = 0.01  # a constant block
    w[2, :32] = torch.linspace(-1, 1, 32)  # equal largest magnitudes of both signs (Q4_0 keeps the first)
    w[3, :32] = torch.arange(32) * 0.125 - 2  # values on a coarse grid: ties at .5 after scaling
    qtype = QTYPES[kind]
    reference = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    ours = fake_quantize(w, kind)
    assert np.array_equal(ours.numpy(), reference)
    again = gguf.quants.dequantize(gguf.quants.quantize(ours.numpy(), qtype), qtype)
    assert np.array_equal(again, ours.numpy())  # written again, nothing is rounded a second time
    assert not torch.equal(ours, w)
    # Straight-through gradient: the identity.
    p = w.clone().requires_grad_(True)
    (GGUFBlockFakeQuantizer(kind)(p) * torch.arange(128.0)).sum().backward()
    assert torch.equal(p.grad, torch.arange(128.0).expand(16, 128))


def test_every_type_reloads_in_transformers_as_written(tiny_teacher, tmp_path):
    model, tok = tiny_teacher.model, tiny_teacher.tokenizer  # untied head, 512 BPE tokens
    sizes, drift = {}, {}
    for t in ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"):
        file = write_gguf(model, tok, tmp_path / t, t)
        assert file == tmp_path / t / file_name(t)
        check = verify_gguf(model, tok, file, t)
        assert check.reload_max_abs_diff <= 1e-4 and check.tokenizer_matches
        sizes[t], drift[t] = check.bytes, check.drift_max_abs_logit
        types = _types(file)
        assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
        assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == types["output.weight"] == t.upper()
    assert drift["f32"] == 0.0
    assert 0 < drift["f16"] < drift["q8_0"] < drift["q4_0"]
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"] > sizes["q5_1"] > sizes["q5_0"]
    assert sizes["q5_0"] > sizes["q4_1"] > sizes["q4_0"]
    reader = gguf.GGUFReader(tmp_path / "q8_0" / file_name("q8_0"))
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert len(reader.get_field("tokenizer.ggml.merges").contents()) > 0


def test_tied_head_and_a_head_width_other_than_hidden_over_heads(tiny_teacher, tmp_path):
    # 4 heads of 32 on a width of 64: what pruning heads leaves. The tied head is written once.
    model = tiny_llama(vocab_size=512, head_dim=32).eval()
    file = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "g", "q8_0")
    assert "output.weight" not in _types(file)
    verify_gguf(model, tiny_teacher.tokenizer, file, "q8_0")
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    assert reloaded.config.tie_word_embeddings and reloaded.config.head_dim == 32
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("scheme", ["gguf_q8_0", "gguf_q4_0", "gguf_q4_1"])
def test_a_student_trained_on_a_llama_cpp_grid_reloads_with_its_fake_quant_logits(tiny_teacher, tmp_path, scheme):
    model = tiny_llama(vocab_size=512).eval()
    spec = schemes.make_spec(scheme, None, ["*norm*"], modules=["linear", "embedding"])
    prepare(model, spec)
    assert len(fake_quantized(model)) == 2 * 7 + 2  # every Linear, the embedding and the tied head
    probe = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = model(input_ids=probe).logits
    trained = convert(model, spec)
    kind = scheme.removeprefix("gguf_")
    assert set(trained.values()) == {kind} and "lm_head.weight" in trained
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after convert
    file = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "g", "f16", trained)
    types = _types(file)
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == kind.upper()
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, fake, rtol=0, atol=1e-4)
    check = verify_gguf(model, tiny_teacher.tokenizer, file, "f16", trained)
    assert check.drift_max_abs_logit <= 1e-4 and check.drift_top1_agreement == 1.0


def test_rounded_copy_is_what_the_file_holds_and_leaves_the_model_alone(tiny_teacher):
    model = tiny_teacher.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = rounded_copy(model, tensor_types(model, "q4_0"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(copy.model.layers[0].mlp.up_proj.weight, fake_quantize(w, "q4_0"))
    assert torch.equal(copy.model.norm.weight, model.model.norm.weight)


def test_what_a_gguf_file_cannot_hold_is_refused(tiny_teacher, tmp_path):
    tok = tiny_teacher.tokenizer
    model = tiny_llama(vocab_size=512)
    with pytest.raises(ConfigError, match=r"export.gguf_type='q4_k_m': .* llama-quantize student-f16.gguf"):
        write_gguf(model, tok, tmp_path / "k", "q4_k_m")
    with pytest.raises(ConfigError, match=r"export.gguf_type='q3': unknown GGUF type; choose one of f32"):
        write_gguf(model, tok, tmp_path / "u", "q3")
    odd = tiny_llama(vocab_size=512, intermediate_size=48)  # down_proj rows 48 wide: no blocks of 32
    with pytest.raises(ConfigError, match=r"'q4_0': model.layers.0.mlp.down_proj.weight has rows 48 wide"):
        write_gguf(odd, tok, tmp_path / "o", "q4_0")
    write_gguf(odd, tok, tmp_path / "o", "f16")  # a float type takes any width
    model.config.distill_layer_shapes = [{"heads": 4}, {"heads": 2}]
    with pytest.raises(ConfigError, match=r"per-layer pruned widths .* \(callbacks.prune.uniform=true\)"):
        write_gguf(model, tok, tmp_path / "p", "f16")
    phi = Phi3ForCausalLM(Phi3Config(vocab_size=512, hidden_size=64, num_hidden_layers=1, pad_token_id=0))
    with pytest.raises(ConfigError, match=r"writes llama, mistral, qwen2 students; this one is phi3; export hf only"):
        write_gguf(phi, tok, tmp_path / "q", "f16")
    assert not any(p.name in ("k", "u", "p", "q") for p in tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ConfigError, match=r"export.formats=\['gguf'\]: give a list with hf and any of gguf, torchao"):
        check_formats({"formats": ["gguf"]})
    with pytest.raises(ConfigError, match=r"callbacks.qat.group_size=64: gguf_q4_0 is llama.cpp's grid"):
        schemes.make_spec("gguf_q4_0", 64, None, "callbacks.qat.")
    with pytest.raises(ConfigError, match=r"scheme='gguf_q8_0': llama.cpp grids are for QAT"):
        schemes.ptq(tiny_llama(vocab_size=512), schemes.make_spec("gguf_q8_0", None, None))


def test_train_exports_a_q4_0_student_as_trained_and_evaluate_reads_the_file(tiny_cfg, tmp_path, cache_dir):
    from distill.config import ConfigError as Refused

    with pytest.raises(Refused, match=r"callbacks.qat.freeze_ranges_step=2: gguf_q4_0 computes each block's scale"):
        train(tiny_cfg("callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "callbacks.qat.freeze_ranges_step=2"))
    cfg = tiny_cfg(
        "callbacks=qat",
        "callbacks.qat.scheme=gguf_q4_0",
        "callbacks.qat.modules=[linear,embedding]",
        "callbacks.qat.skip=['*norm*']",
        "export.formats=[hf,gguf]",
        "trainer.max_steps=6",
        *QUIET,
        output_dir=tmp_path / "run",
    )
    metrics, objects = train(cfg)
    file = tmp_path / "run" / "student_gguf" / "student-q4_0.gguf"  # gguf_type auto: the QAT grid's type
    types = _types(file)
    assert {t for n, t in types.items() if "norm" not in n} == {"Q4_0"}
    assert {t for n, t in types.items() if "norm" in n} == {"F32"}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["run"]["gguf_max_abs_logit_vs_student"] <= 1e-4  # the file is the trained student
    assert report["run"]["artifact"] == str(file.parent)  # and the smallest export, so the report's size is its
    assert metrics["cost/student/bytes_disk"] == file.stat().st_size
    assert file.stat().st_size < 0.5 * (Path(objects["export_dir"]) / "model.safetensors").stat().st_size

    # evaluate.py on the file itself: the same held-out numbers as the run's evaluation of the student.
    from evaluate import evaluate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose(
            config_name="evaluate",
            overrides=[f"model={file}", "teacher=tiny_random", "data.block_size=32", "data.batch_size=4", *QUIET],
        )
    with open_dict(ecfg):
        ecfg.paths.root_dir = str(ROOT)
        ecfg.paths.output_dir = str(tmp_path / "eval")
        ecfg.paths.cache_dir = str(cache_dir)
        ecfg.data.cache_dir = str(cache_dir / "data")
        ecfg.eval = cfg.eval
    result = evaluate(ecfg)
    on_file = result["metrics"]["student"]
    assert on_file["heldout/ppl"] == pytest.approx(metrics["heldout/student/ppl"], rel=1e-4)
    assert on_file["heldout/top1_agreement"] == pytest.approx(metrics["heldout/student/top1_agreement"], abs=1e-6)
    assert on_file["cost/bytes_disk"] == file.stat().st_size


def test_pruned_and_shared_students_export_to_gguf(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "callbacks=[prune,share]",
        *TINY_MODELS,
        "callbacks.prune.channels=0.5",
        "callbacks.prune.heads=3",
        "callbacks.prune.end_step=4",
        "callbacks.prune.every_n_steps=2",
        "callbacks.share.start_step=4",
        "trainer.max_steps=6",
        "export.formats=[hf,gguf]",
        "export.gguf_type=q8_0",
        *QUIET,
    )
    _, objects = train(cfg)
    file = tmp_path / "student_gguf" / "student-q8_0.gguf"
    reader = gguf.GGUFReader(file)
    assert reader.get_field("llama.feed_forward_length").contents() == 64  # 128 channels, half pruned
    assert reader.get_field("llama.attention.head_count").contents() == 3
    assert reader.get_field("llama.block_count").contents() == 4
    tensors = {t.name: t for t in reader.tensors}
    # Shared layers are materialised: each layer has its tensors, equal within a sharing group.
    assert np.array_equal(tensors["blk.0.ffn_up.weight"].data, tensors["blk.1.ffn_up.weight"].data)
    assert not np.array_equal(tensors["blk.1.ffn_up.weight"].data, tensors["blk.2.ffn_up.weight"].data)
    check = objects["gguf"]
    assert check.reload_max_abs_diff <= 1e-4 and check.drift_top1_agreement >= 0.9


def test_a_file_that_fails_its_check_is_not_published(tiny_teacher, tmp_path, monkeypatch):
    from distill.export import gguf as gguf_export

    model, tok = tiny_teacher.model, tiny_teacher.tokenizer
    good = gguf_export.export_gguf(model, tok, tmp_path / "g", "q8_0")
    before = good.file.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("GGUF export does not reproduce the model")

    monkeypatch.setattr(gguf_export, "verify_gguf", broken)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        gguf_export.export_gguf(model, tok, tmp_path / "g", "q8_0")
    assert good.file.read_bytes() == before  # the previous file stays, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # and no half-written folder is left


def test_students_a_gguf_file_cannot_hold_are_refused_before_training(tiny_cfg, tmp_path):
    with pytest.raises(
        ConfigError, match=r"has rows 48 wide, not a multiple of q4_0's blocks of 32; use f32, f16 or bf16"
    ):
        train(tiny_cfg("export.formats=[hf,gguf]", "export.gguf_type=q4_0", "student.intermediate_size=48"))
    assert not (tmp_path / "checkpoints").exists()  # refused at start-up, not after the run
    with pytest.raises(ConfigError, match=r"export.formats='gguf': give a list with hf"):
        train(tiny_cfg("export.formats=gguf"))
    with pytest.raises(ConfigError, match=r"cannot hold per-layer pruned widths \(callbacks.prune.uniform=false\)"):
        train(tiny_cfg("callbacks=prune", "callbacks.prune.uniform=false", "export.formats=[hf,gguf]"))
    with pytest.raises(ConfigError, match=r"set callbacks.prune.bias_compensation=false"):
        train(tiny_cfg("callbacks=prune", "callbacks.prune.bias_compensation=true", "export.formats=[hf,gguf]"))
    with pytest.raises(ConfigError, match=r"torchao cannot hold a student with callbacks.share"):
        train(tiny_cfg("callbacks=[share,qat]", "student.num_layers=2", "export.formats=[hf,torchao]"))


def test_biased_and_bf16_students_are_refused_with_the_fix(tiny_teacher, tmp_path):
    biased = tiny_llama(vocab_size=512, attention_bias=True)
    with pytest.raises(
        ConfigError,
        match=r"for llama \(model.layers.0.self_attn.q_proj.bias\); set callbacks.prune.bias_compensation=false",
    ):
        write_gguf(biased, tiny_teacher.tokenizer, tmp_path / "b", "f16")
    half = tiny_llama(vocab_size=512).to(torch.bfloat16)
    spec = schemes.make_spec("gguf_q4_0", None, ["*norm*"], modules=["linear", "embedding"])
    with pytest.raises(ConfigError, match=r"callbacks.qat.scheme='gguf_q4_0': llama.cpp grids need fp32 weights"):
        prepare(half, spec)
    # A bf16 student still exports (the file is checked against its rounding in fp32).
    file = write_gguf(half, tiny_teacher.tokenizer, tmp_path / "h", "bf16")
    assert verify_gguf(half, tiny_teacher.tokenizer, file, "bf16").reload_max_abs_diff <= 1e-4


# --- K-quants (Q4_K, Q3_K): this project's encoder, read back by gguf-py's decoder ----------------------------


@pytest.mark.parametrize(("kind", "row_bytes"), [("q4_k", 144), ("q3_k", 110)])
def test_k_quant_bytes_decode_in_gguf_py_to_the_fake_quant_values(kind, row_bytes):
    torch.manual_seed(0)
    w = torch.randn(8, 512) * 0.05
    w[0, :256] = 0  # an all-zero super-block
    w[1, :32] = 0  # one all-zero sub-block among others
    w[2, :256] = 0.01  # constant and positive: no minimum below 0
    w[3, :256] = -torch.rand(256)  # negative only
    w[4, :16] = 1000.0  # one sub-block far larger than the rest: the others get 6-bit scales near 0
    ours = fake_quantize(w, kind)
    blocks = encode_k(w.numpy(), kind)
    assert blocks.shape == (8, 2 * row_bytes) and blocks.dtype == np.uint8
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind.upper()])
    assert np.array_equal(decoded, ours.numpy())  # bit for bit, in ggml's block layout
    assert torch.equal(fake_quantize(ours, kind), ours)  # a fixed point: written again, nothing moves
    assert np.array_equal(encode_k(ours.numpy(), kind), blocks)
    assert torch.equal(ours[0, :256], torch.zeros(256)) and not torch.equal(ours, w)
    levels = 16 if kind == "q4_k" else 8
    assert all(len(torch.unique(ours[5, i : i + 16])) <= levels for i in range(0, 512, 16))
    with pytest.raises(ValueError, match=r"multiple of 256 wide; got shape \(2, 576\)"):
        fake_quantize(torch.randn(2, 576), kind)


def test_q4_k_holds_an_asymmetric_q4_1_grid_that_q4_0_cannot():
    # The embedded teacher's weights sit on Q4_1's grid (a scale and a minimum per 32); Q4_K has a minimum
    # per 32 too, and at the same 4.5 bits per weight it keeps them far closer than symmetric Q4_0 does.
    torch.manual_seed(1)
    w = fake_quantize(torch.randn(64, 256) * 0.05 + 0.02, "q4_1")
    err = {k: (fake_quantize(w, k) - w).pow(2).mean().item() for k in ("q4_0", "q4_k")}
    assert err["q4_k"] < 0.5 * err["q4_0"]


def test_a_student_trained_on_a_mix_of_types_reloads_with_its_fake_quant_logits(tiny_teacher, tmp_path):
    model = tiny_llama(vocab_size=512, intermediate_size=256).eval()  # down_proj rows 256 wide
    mix = {"*.mlp.down_proj": "q4_k", "*.layers.1.mlp.down_proj": "q3_k"}  # the later glob wins
    spec = schemes.make_spec("gguf_q4_0", None, ["*norm*"], modules=["linear", "embedding"], gguf_types=mix)
    assert schemes.QuantSpec.from_dict(spec.to_dict()) == spec  # what checkpoints and the structure log keep
    prepare(model, spec)
    assert model.model.layers[0].mlp.down_proj.weight_fake_quantizer.kind == "q4_k"
    probe = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = model(input_ids=probe).logits
    trained = convert(model, spec)
    assert trained["model.layers.0.mlp.down_proj.weight"] == "q4_k"
    assert trained["model.layers.1.mlp.down_proj.weight"] == "q3_k"
    assert trained["model.layers.1.mlp.up_proj.weight"] == trained["lm_head.weight"] == "q4_0"
    file = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "g", "q4_0", trained)
    types = _types(file)
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q4_K", "Q3_K")
    assert types["blk.1.ffn_up.weight"] == types["token_embd.weight"] == "Q4_0"
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, fake, rtol=0, atol=1e-4)
    check = verify_gguf(model, tiny_teacher.tokenizer, file, "q4_0", trained)
    assert check.drift_max_abs_logit <= 1e-4 and check.drift_top1_agreement == 1.0


def test_k_quants_that_do_not_fit_are_refused_with_the_fix(tiny_teacher, tmp_path):
    model = tiny_llama(vocab_size=512)  # every row 64 or 128 wide: no super-block of 256 fits
    with pytest.raises(
        ConfigError, match=r"export.gguf_type='q4_k': .* not a multiple of q4_k's blocks of 256; use q8_0, q4_0"
    ):
        write_gguf(model, tiny_teacher.tokenizer, tmp_path / "k", "q4_k")
    assert not (tmp_path / "k").exists()
    field = "callbacks.qat.gguf_types"
    with pytest.raises(ConfigError, match=rf"{field}=.*q4_k.*: model.layers.0.mlp.up_proj has rows 64 wide"):
        prepare(model, schemes.make_spec("gguf_q4_0", None, None, "callbacks.qat.", gguf_types={"*up_proj": "q4_k"}))
    with pytest.raises(ConfigError, match=rf"{field}=.*'\*.mlp.dwn_proj'.*: the glob matches no quantized module"):
        prepare(
            model, schemes.make_spec("gguf_q4_0", None, None, "callbacks.qat.", gguf_types={"*.mlp.dwn_proj": "q8_0"})
        )
    with pytest.raises(ConfigError, match=rf"{field}=.*: unknown llama.cpp type; choose from q8_0"):
        schemes.make_spec("gguf_q4_0", None, None, "callbacks.qat.", gguf_types={"*": "q2_k"})
    with pytest.raises(ConfigError, match=rf"{field}=.*: per-module llama.cpp types need a gguf_\* scheme"):
        schemes.make_spec("int4_weight_only", 32, None, "callbacks.qat.", gguf_types={"*": "q4_k"})
    with pytest.raises(
        ConfigError, match=r"callbacks.qat.scheme='gguf_q4_k': .* rows 64 wide.*give it one of q8_0, q4_0, q4_1"
    ):
        prepare(model, schemes.make_spec("gguf_q4_k", None, None, "callbacks.qat."))


def test_a_tied_embedding_and_head_cannot_take_two_types():
    model = tiny_llama(vocab_size=512)
    spec = schemes.make_spec(
        "gguf_q4_0", None, ["*norm*"], "callbacks.qat.", ["linear", "embedding"], gguf_types={"lm_head": "q8_0"}
    )
    with pytest.raises(ConfigError, match=r"gguf_types=.*: lm_head and model.embed_tokens share one weight but get"):
        prepare(model, spec)


def test_a_model_loaded_from_gguf_exports_again(tiny_teacher, tmp_path):
    # transformers marks a model read from a GGUF file as quantized and refuses .float() on it; the export's
    # rounded copy must not need it (the PTQ baselines write the GGUF-loaded teacher).
    file = write_gguf(tiny_llama(vocab_size=512), tiny_teacher.tokenizer, tmp_path / "a", "f32")
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval()
    assert loaded.is_quantized
    again = write_gguf(loaded, tiny_teacher.tokenizer, tmp_path / "b", "q4_0")
    assert verify_gguf(loaded, tiny_teacher.tokenizer, again, "q4_0").reload_max_abs_diff <= 1e-4


# --- IQ4_NL, Q2_K and llama.cpp's importance-matrix PTQ -----------------------------------------------------


def test_a_student_trained_on_the_iq4_nl_grid_reloads_with_its_fake_quant_logits(tiny_teacher, tmp_path):
    model = tiny_llama(vocab_size=512).train()
    spec = schemes.make_spec("gguf_iq4_nl", None, ["*norm*"], modules=["linear", "embedding"])
    prepare(model, spec)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few QAT steps: the weights move off their first grid values
        ids = torch.randint(0, 512, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    model.eval()
    probe = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake = model(input_ids=probe).logits
    trained = convert(model, spec)
    assert set(trained.values()) == {"iq4_nl"} and "lm_head.weight" in trained
    file = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "g", "f16", trained)
    types = _types(file)
    assert {t for n, t in types.items() if "norm" not in n} == {"IQ4_NL"}
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, fake, rtol=0, atol=1e-4)
    check = verify_gguf(model, tiny_teacher.tokenizer, file, "f16", trained)
    assert check.drift_max_abs_logit <= 1e-4 and check.drift_top1_agreement == 1.0


def _llama_cpp_rows(data: np.ndarray, key: str, model: torch.nn.Module) -> np.ndarray:
    """The rows llama.cpp's converter writes: q/k rows from rotate-half pairs to adjacent pairs (its permute)."""
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    proj = key.rsplit(".", 2)[-2]
    if proj not in heads:
        return data
    n = heads[proj]
    return data.reshape(n, 2, data.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(data.shape)


def test_ptq_with_an_imatrix_and_a_type_mix_writes_llama_quantizes_bytes(tiny_teacher, tmp_path):
    from distill.compress.quant import imatrix, llama_quants
    from distill.export.gguf import glob_types, imatrix_modules, tensor_names

    model = tiny_llama(vocab_size=512, intermediate_size=256).eval()  # tied head; down_proj rows 256 wide
    mix = {"*": "iq4_nl", "*.mlp.down_proj": "q2_k", "*.self_attn.o_proj": "q5_0", "model.embed_tokens": "q8_0"}
    types = glob_types(model, mix)
    assert types["lm_head.weight"] == "iq4_nl" and types["model.embed_tokens.weight"] == "q8_0"
    names = imatrix_modules(model)
    ids = [torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))]
    importance = imatrix.collect(model, list(names), ids).by_weight()
    file = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "w", "iq4_nl", types, importance=importance)
    plain = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "p", "iq4_nl", types)
    got = {t.name: t for t in gguf.GGUFReader(file).tensors}
    without = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(plain).tensors}
    kinds, state = {}, model.state_dict()
    for key, name in tensor_names(model).items():
        kind = tensor_types(model, "iq4_nl", types)[key]
        kinds[name] = got[name].tensor_type.name
        if kind == "f32":
            continue
        data = _llama_cpp_rows(state[key].numpy(), key, model)
        want = llama_quants.quantize(data, kind, importance.get(key))
        np.testing.assert_array_equal(np.asarray(got[name].data), want, err_msg=name)
        if key in importance:  # the imatrix changed the rounding
            assert not np.array_equal(np.asarray(got[name].data), without[name]), name
    assert (kinds["token_embd.weight"], kinds["blk.0.ffn_down.weight"]) == ("Q8_0", "Q2_K")
    assert (kinds["blk.1.attn_output.weight"], kinds["blk.1.attn_q.weight"]) == ("Q5_0", "IQ4_NL")
    assert "output.weight" not in kinds  # the tied head is token_embd, in the embedding's type
    check = verify_gguf(model, tiny_teacher.tokenizer, file, "iq4_nl", types, importance)
    assert check.reload_max_abs_diff <= 1e-4 and check.tokenizer_matches
    with pytest.raises(ConfigError, match=r"types=\{'\*.mlp.dwn_proj': 'q2_k'\}: the glob matches no weight matrix"):
        glob_types(model, {"*.mlp.dwn_proj": "q2_k"})
    with pytest.raises(ConfigError, match=r"types='q3': unknown GGUF type"):
        glob_types(model, {"*": "q3"})
    with pytest.raises(ConfigError, match=r"'q2_k': model.embed_tokens.weight has rows 64 wide.* use q8_0, .*iq4_nl"):
        write_gguf(model, tiny_teacher.tokenizer, tmp_path / "k", "q2_k")


def _gguf_cfg(tmp_path: Path, cache_dir: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="gguf", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(cache_dir)
        cfg.data.cache_dir = str(cache_dir / "data")
        cfg.data.block_size = 32
    return cfg


def test_the_gguf_cli_runs_llama_cpps_imatrix_ptq(tiny_teacher, tmp_path, cache_dir):
    from distill.compress.quant import imatrix
    from distill.export.gguf import imatrix_modules, run

    model = tiny_llama(vocab_size=512, intermediate_size=256)
    model.save_pretrained(tmp_path / "fp")
    tiny_teacher.tokenizer.save_pretrained(tmp_path / "fp")
    mix = "types={*.mlp.down_proj:q2_k,model.embed_tokens:q8_0}"
    auto = run(
        _gguf_cfg(
            tmp_path,
            cache_dir,
            f"model={tmp_path / 'fp'}",
            "type=iq4_nl",
            "imatrix=auto",
            "imatrix_batches=2",
            mix,
            f"out={tmp_path / 'auto'}",
        )
    )
    assert auto.reload_max_abs_diff <= 1e-4
    collected = imatrix.read(tmp_path / "auto" / "imatrix.gguf", imatrix_modules(model))
    assert len(collected.sums) == 14 and collected.chunk_size == 32 and collected.chunk_count == 8
    assert collected.datasets == ("distill embedded training split: 8 rows",)
    # llama-quantize's route: the same imatrix.gguf given back writes the same file.
    again = run(
        _gguf_cfg(
            tmp_path,
            cache_dir,
            f"model={tmp_path / 'fp'}",
            "type=iq4_nl",
            mix,
            f"imatrix={tmp_path / 'auto' / 'imatrix.gguf'}",
            f"out={tmp_path / 'file'}",
        )
    )
    plain = run(
        _gguf_cfg(tmp_path, cache_dir, f"model={tmp_path / 'fp'}", "type=iq4_nl", mix, f"out={tmp_path / 'plain'}")
    )
    tensors = [{t.name: np.asarray(t.data) for t in gguf.GGUFReader(c.file).tensors} for c in (auto, again, plain)]
    assert all(np.array_equal(tensors[0][n], tensors[1][n]) for n in tensors[0])
    assert not np.array_equal(tensors[0]["blk.0.ffn_down.weight"], tensors[2]["blk.0.ffn_down.weight"])
    assert np.array_equal(tensors[0]["token_embd.weight"], tensors[2]["token_embd.weight"])  # never weighted
    assert _types(auto.file)["blk.1.ffn_down.weight"] == "Q2_K"
    with pytest.raises(ConfigError, match=r"imatrix='.*nothing.gguf': no such file; give llama-imatrix's"):
        run(
            _gguf_cfg(
                tmp_path, cache_dir, f"model={tmp_path / 'fp'}", "type=iq4_nl", f"imatrix={tmp_path}/nothing.gguf"
            )
        )
    narrow = tiny_llama(vocab_size=512)  # its down_proj has 128 columns, the imatrix's 256
    narrow.save_pretrained(tmp_path / "narrow")
    tiny_teacher.tokenizer.save_pretrained(tmp_path / "narrow")
    with pytest.raises(ConfigError, match=r"blk.0.ffn_down.weight has 256 sums but the model's has 128 columns"):
        run(
            _gguf_cfg(
                tmp_path,
                cache_dir,
                f"model={tmp_path / 'narrow'}",
                "type=iq4_nl",
                f"imatrix={tmp_path / 'auto' / 'imatrix.gguf'}",
            )
        )


@pytest.mark.slow
def test_train_on_the_iq4_nl_grid_exports_the_student_as_trained(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "callbacks=qat",
        "callbacks.qat.scheme=gguf_iq4_nl",
        "callbacks.qat.modules=[linear,embedding]",
        "callbacks.qat.skip=['*norm*']",
        "export.formats=[hf,gguf]",
        "trainer.max_steps=4",
        *QUIET,
        output_dir=tmp_path / "run",
    )
    train(cfg)
    file = tmp_path / "run" / "student_gguf" / "student-iq4_nl.gguf"  # gguf_type auto: the QAT grid's type
    types = _types(file)
    assert {t for n, t in types.items() if "norm" not in n} == {"IQ4_NL"}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["run"]["gguf_max_abs_logit_vs_student"] <= 1e-4  # the file is the trained student
