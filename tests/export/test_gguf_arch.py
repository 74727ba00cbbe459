"""The GGUF export of Qwen2 and Mistral students: llama.cpp's layout for each, reloaded through transformers."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distill.compress.prune.surgery import add_biases
from distill.compress.quant import schemes
from distill.compress.quant.qat import convert, prepare
from distill.config import ConfigError
from distill.export import gguf as gguf_export
from distill.export.gguf import RELOAD_ATOL, verify_gguf, write_gguf

SHAPE = {
    "vocab_size": 512,  # the tiny teacher's BPE tokenizer
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_qwen2(seed: int = 0, **config: object) -> Qwen2ForCausalLM:
    """A 2-layer, width-64 Qwen2 with a tied head and q/k/v biases drawn large enough to matter."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**(SHAPE | {"tie_word_embeddings": True} | config))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)  # transformers initialises them to 0, which a dropped bias would match
    return model


def tiny_mistral(seed: int = 0, **config: object) -> MistralForCausalLM:
    """A 2-layer, width-64 Mistral with an untied head and no sliding window."""
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**(SHAPE | {"sliding_window": None} | config))).eval()


BUILD = {"qwen2": tiny_qwen2, "mistral": tiny_mistral}


def _q_rows_as_written(model: PreTrainedModel) -> np.ndarray:
    """Layer 0's query weight in the row order llama.cpp's converter writes for this architecture."""
    w = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    if model.config.model_type == "qwen2":
        return w  # qwen2 rotates halves in llama.cpp too: rows kept as Hugging Face has them
    heads = model.config.num_attention_heads
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_students_reload_as_written(tiny_teacher, tmp_path, arch, gguf_type):
    model = BUILD[arch]()
    file = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "g", gguf_type)
    check = verify_gguf(model, tiny_teacher.tokenizer, file, gguf_type)
    assert check.reload_max_abs_diff <= RELOAD_ATOL and check.tokenizer_matches
    reader = gguf.GGUFReader(file)
    tensors = {t.name: t for t in reader.tensors}
    assert reader.get_field("general.architecture").contents() == ("qwen2" if arch == "qwen2" else "llama")
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == gguf_type.upper()
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    if arch == "qwen2":
        assert "output.weight" not in tensors  # tied: llama.cpp and transformers reuse token_embd
        for proj in ("q", "k", "v"):
            bias = getattr(model.model.layers[1].self_attn, f"{proj}_proj").bias.detach().numpy()
            assert tensors[f"blk.1.attn_{proj}.bias"].tensor_type.name == "F32"
            assert np.array_equal(tensors[f"blk.1.attn_{proj}.bias"].data, bias)  # as is: no q/k reordering
    else:
        assert tensors["output.weight"].tensor_type.name == gguf_type.upper()
    if gguf_type == "f32":
        assert check.drift_max_abs_logit == 0.0  # nothing rounded: the file is the student
        assert np.array_equal(tensors["blk.0.attn_q.weight"].data, _q_rows_as_written(model))
    else:
        assert check.drift_max_abs_logit > 0 and check.drift_top1_agreement >= 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    # transformers rebuilds a llama-arch file as Mistral only when general.name is exactly "mistral"
    # (modeling_gguf_pytorch_utils.load_gguf_checkpoint); as Llama it computes the same without a window.
    assert type(reloaded).__name__ == ("Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM")


def test_a_wrong_row_order_for_qwen2_fails_the_reload_check(tiny_teacher, tmp_path, monkeypatch):
    # The check can tell: the same student written with llama's q/k reordering does not reload as itself.
    model = tiny_qwen2()
    monkeypatch.setitem(gguf_export.ARCHS, "qwen2", dataclasses.replace(gguf_export.ARCHS["qwen2"], permute_qk=True))
    file = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "g", "f32")
    with pytest.raises(RuntimeError, match="does not reproduce the model"):
        verify_gguf(model, tiny_teacher.tokenizer, file, "f32")


def test_a_qwen2_student_trained_on_a_mix_of_types_reloads_with_its_fake_quant_logits(tiny_teacher, tmp_path):
    model = tiny_qwen2(intermediate_size=256)  # down_proj rows 256 wide: a K-quant fits
    mix = {"*.mlp.down_proj": "q4_k", "*.self_attn.q_proj": "q8_0"}
    spec = schemes.make_spec("gguf_q4_0", None, ["*norm*"], modules=["linear", "embedding"], gguf_types=mix)
    prepare(model, spec)
    probe = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = model(input_ids=probe).logits
    trained = convert(model, spec)
    file = write_gguf(model, tiny_teacher.tokenizer, tmp_path / "g", "q4_0", trained)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(file).tensors}
    assert (types["blk.0.ffn_down.weight"], types["blk.1.attn_q.weight"]) == ("Q4_K", "Q8_0")
    assert types["blk.1.attn_k.weight"] == types["token_embd.weight"] == "Q4_0"
    assert types["blk.1.attn_q.bias"] == "F32"
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, fake, rtol=0, atol=RELOAD_ATOL)
    check = verify_gguf(model, tiny_teacher.tokenizer, file, "q4_0", trained)
    assert check.drift_max_abs_logit <= RELOAD_ATOL and check.drift_top1_agreement == 1.0


def test_what_a_qwen2_or_mistral_file_cannot_hold_is_refused(tiny_teacher, tmp_path):
    tok = tiny_teacher.tokenizer

    def refused(model: PreTrainedModel, pattern: str) -> None:
        with pytest.raises(ConfigError, match=pattern):
            write_gguf(model, tok, tmp_path / "r", "f16")

    refused(tiny_mistral(sliding_window=16), r"sliding window of 16 tokens, shorter than its 131072-token context")
    qwen_window = tiny_qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=1)
    refused(qwen_window, r"sliding window of 16 tokens, .* give the student sliding_window=null")
    refused(tiny_qwen2(head_dim=32), r"heads are 32 wide, not hidden_size / heads \(64 / 4: .*prune.heads=null")
    compensated = tiny_qwen2()
    add_biases(compensated, ["attention"])  # bias compensation: an o_proj bias Qwen2 does not have
    refused(compensated, r"does not read back for qwen2 \(model.layers.0.self_attn.o_proj.bias\)")
    gemma = GemmaForCausalLM(GemmaConfig(**SHAPE, head_dim=16))
    refused(gemma, r"writes llama, mistral, qwen2 students; this one is gemma; export hf only")
    assert not (tmp_path / "r").exists()  # nothing half-written
    # A window no shorter than the context never applies: such a Mistral (and a windowless Qwen2) is written.
    wide = tiny_mistral(sliding_window=64, max_position_embeddings=64)
    write_gguf(wide, tok, tmp_path / "w", "f32")
    assert verify_gguf(wide, tok, tmp_path / "w" / "student-f32.gguf", "f32").drift_max_abs_logit == 0.0
