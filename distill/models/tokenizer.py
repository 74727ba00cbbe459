"""Tokenizers: loading, identity fingerprints, the vocabulary check, and a tiny offline tokenizer."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distill.config import ConfigError
from distill.data.corpus import embedded_corpus
from distill.fingerprint import tokenizer_fingerprint
from distill.models.loading import not_available
from distill.runtime.files import atomic_directory


def load_tokenizer(
    source: str,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    field: str = "teacher",
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it a pad token (the EOS token) when it has none."""
    try:
        tok = AutoTokenizer.from_pretrained(
            source, gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision
        )
    except OSError as err:
        raise not_available(field, source, err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """A readable name for error messages."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def shared_vocab_size(
    teacher_tok: PreTrainedTokenizerBase,
    student_tok: PreTrainedTokenizerBase,
    teacher_vocab: int,
    student_vocab: int,
    training: bool = True,
) -> int:
    """Check that teacher and student share a tokenizer and return the vocabulary size to compare over.

    Models often pad their embedding matrix past the tokenizer (to a multiple of 64, say). When the
    tokenizers are identical and only the sizes differ, the distributions are compared over the
    shared prefix, which holds every real token. Anything else stops the run; ``training`` adds that a
    training run can distil across tokenizers (``distill.objective.cross_tokenizer``).
    """
    t_fp, s_fp = tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok)
    if t_fp != s_fp:
        cross = ", or distil across tokenizers with distill.objective.cross_tokenizer=align (or uld)"
        raise ConfigError(
            f"student tokenizer {tokenizer_name(student_tok)!r} (fingerprint {s_fp}) differs from teacher tokenizer "
            f"{tokenizer_name(teacher_tok)!r} (fingerprint {t_fp}): distillation compares next-token distributions, "
            "so both must use the same tokenizer; pick a student built from the teacher (student=tiny or "
            "student=from_teacher) or a pretrained student of the same family" + (cross if training else "")
        )
    shared = min(teacher_vocab, student_vocab)
    if len(teacher_tok) > shared:
        raise ConfigError(
            f"tokenizer {tokenizer_name(teacher_tok)!r} has {len(teacher_tok)} tokens but a model has only "
            f"{shared} embedding rows (teacher {teacher_vocab}, student {student_vocab}); resize the smaller "
            "model's embeddings to at least the tokenizer size"
        )
    return shared


def train_tiny_tokenizer(vocab_size: int, cache_dir: str | Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the embedded corpus, for fast offline tests.

    Training takes about a second; the result is cached on disk so every test process shares it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(cache_dir) / f"tiny-bpe-{vocab_size}"
    if not (out / "tokenizer.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(embedded_corpus(), trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
        )
        # A concurrent process may have published the same tokenizer first; its copy is kept.
        with atomic_directory(out, replace=False) as tmp:
            fast.save_pretrained(tmp)
    return load_tokenizer(str(out), field="teacher.tokenizer")
