"""Teacher and student loading, student initialisation, and the vocabulary check."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import ConfigError
from distill.models.teacher import load_teacher, random_teacher
from distill.models.tokenizer import shared_vocab_size, tokenizer_fingerprint, train_tiny_tokenizer
from students import from_teacher, pretrained, scratch


def test_teacher_is_frozen_and_stays_in_eval(tiny_teacher):
    assert all(not p.requires_grad for p in tiny_teacher.parameters())
    tiny_teacher.train()
    assert not tiny_teacher.training and not tiny_teacher.model.training
    out = tiny_teacher(torch.randint(0, 512, (1, 8)))
    assert not out.logits.requires_grad


def test_teacher_from_local_folder_and_missing_hub_id(tiny_teacher, tmp_path):
    tiny_teacher.model.save_pretrained(tmp_path / "t")
    tiny_teacher.tokenizer.save_pretrained(tmp_path / "t")
    t = load_teacher(str(tmp_path / "t"))
    probe = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(t(probe).logits, tiny_teacher(probe).logits)
    assert tokenizer_fingerprint(t.tokenizer) == tokenizer_fingerprint(tiny_teacher.tokenizer)
    assert load_teacher(str(tmp_path / "t"), dtype="bfloat16").model.dtype == torch.bfloat16
    # The size of what the user started from: the folder's weight files (config and tokenizer left out).
    assert t.shipped_bytes == (tmp_path / "t" / "model.safetensors").stat().st_size
    assert tiny_teacher.shipped_bytes is None  # built in memory: nothing was shipped

    with pytest.raises(ConfigError, match=r"teacher.path='no-such-org/no-such-model': not a model folder.*offline"):
        load_teacher("no-such-org/no-such-model")
    with pytest.raises(ConfigError, match=r"teacher.dtype='fp8'"):
        load_teacher(str(tmp_path / "t"), dtype="fp8")
    with pytest.raises(ConfigError, match=r"teacher.package='not_a_pkg'.*pip install"):
        load_teacher(package="not_a_pkg", gguf_file="x.gguf")


def test_from_teacher_copies_evenly_spaced_layers(cache_dir):
    teacher = random_teacher(cache_dir=cache_dir, num_layers=5)
    student = from_teacher.build(teacher, num_layers=3)
    assert from_teacher.pick_layers(5, 3) == [0, 2, 4]
    t_sd, s_sd = teacher.model.state_dict(), student.state_dict()
    for s_idx, t_idx in enumerate([0, 2, 4]):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(s_sd[f"model.layers.{s_idx}.{name}"], t_sd[f"model.layers.{t_idx}.{name}"])
    assert torch.equal(s_sd["model.embed_tokens.weight"], t_sd["model.embed_tokens.weight"])
    assert torch.equal(s_sd["lm_head.weight"], t_sd["lm_head.weight"])
    assert s_sd["model.embed_tokens.weight"].data_ptr() != t_sd["model.embed_tokens.weight"].data_ptr()
    assert student.config.num_hidden_layers == 3 and all(p.requires_grad for p in student.parameters())

    # A full-depth copy is the teacher.
    full = from_teacher.build(teacher, num_layers=5)
    probe = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=probe).logits, teacher(probe).logits)


def test_from_teacher_refuses_too_deep_or_too_wide(tiny_teacher):
    with pytest.raises(ConfigError, match=r"student.num_layers=3: from_teacher can copy between 1 and 2 layers"):
        from_teacher.build(tiny_teacher, num_layers=3)
    with pytest.raises(ConfigError, match=r"student.hidden_size=128: wider than the teacher \(64\)"):
        from_teacher.build(tiny_teacher, num_layers=1, hidden_size=128)
    with pytest.raises(ConfigError, match=r"student.layers=\[0, 5\]"):
        from_teacher.build(tiny_teacher, num_layers=2, layers=[0, 5])


def test_scratch_student_shares_teacher_vocab(tiny_teacher):
    s = scratch.build(tiny_teacher, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    assert s.config.vocab_size == 512 and s.config.head_dim == 8 and s.config.intermediate_size == 128
    assert s.config.eos_token_id == tiny_teacher.config.eos_token_id
    with pytest.raises(ConfigError, match="student.num_kv_heads=3"):
        scratch.build(tiny_teacher, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=3)


def test_pretrained_student_with_same_tokenizer_and_padded_vocab(tiny_teacher, tmp_path):
    s = scratch.build(tiny_teacher, hidden_size=32, num_layers=1, num_heads=2)
    s.resize_token_embeddings(576)  # padded to a multiple of 64, as many checkpoints are
    s.save_pretrained(tmp_path / "s")
    tiny_teacher.tokenizer.save_pretrained(tmp_path / "s")
    model = pretrained.load(tiny_teacher, path=str(tmp_path / "s"))
    assert model.get_output_embeddings().weight.shape[0] == 576
    assert shared_vocab_size(tiny_teacher.tokenizer, tiny_teacher.tokenizer, 512, 576) == 512


def test_tokenizer_mismatch_is_refused(tiny_teacher, tmp_path, cache_dir):
    other = train_tiny_tokenizer(300, cache_dir)
    s = AutoModelForCausalLM.from_config(
        tiny_teacher.config.__class__(
            vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    s.save_pretrained(tmp_path / "s")
    other.save_pretrained(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"student tokenizer .* differs from teacher tokenizer .*same tokenizer"):
        pretrained.load(tiny_teacher, path=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="differs from teacher tokenizer"):
        shared_vocab_size(tiny_teacher.tokenizer, other, 512, 300)


def test_a_checkpoint_holding_inf_or_nan_is_refused_at_load_naming_the_tensor(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.config import ConfigError
    from distill.models.loading import load_causal_lm

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(
        ConfigError, match=r"^student.path='.*m': its weight model.layers.0.mlp.up_proj.weight holds 1 non-finite"
    ):
        load_causal_lm(str(tmp_path / "m"), field="student")
