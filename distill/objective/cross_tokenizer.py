"""Cross-tokenizer distillation: teacher and student read the same text through different tokenizers.

Their logits then live on different vocabularies and their positions on different grids, so two things are
needed before any divergence can be taken:

* *Where* to compare: positions at which both models have read exactly the same text prefix. Each token is
  mapped to the bytes it contributes to the decoded text (:func:`token_byte_ends`), and positions whose
  running byte counts coincide are paired (:func:`aligned_positions`).
* *What* to compare: either the tokens whose byte strings exist in both vocabularies, plus one bucket for all
  the rest (:class:`SharedVocab`, :func:`align_kd`), or a vocabulary-free comparison of the sorted
  probability vectors (:func:`uld_loss`, Universal Logit Distillation, Boizard et al., 2024).

Two tokenizer styles are understood, detected from the tokenizer's own decoder:

* byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen): every token string is written in an alphabet of 256
  printable characters, one per byte (``'Ġthe'`` is ``b' the'``);
* SentencePiece (Llama 2, Mistral, Gemma): ``'▁'`` stands for a space and ``'<0x0A>'`` is a byte-fallback
  token for one raw byte; the decoder usually drops the space that a dummy prefix put before the first word.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
_SPACE_MARK = "▁"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: one printable character per byte value, character → byte.

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, soft hyphen, ...) are
    shifted to code points 256 and up, in byte order. This is the convention every byte-level BPE uses.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    for n, b in enumerate(shifted):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


_ALPHABET = _byte_alphabet()
_ALPHABET_SET = frozenset(_ALPHABET)
# str.translate to Latin-1 code points, then .encode("latin-1"): the per-character loop runs in C.
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in _ALPHABET.items()})


def _byte_level_piece(token: str) -> bytes:
    """Bytes of a byte-level token, as the ByteLevel decoder produces them.

    A token with any character outside the alphabet (an added token such as ``'<|user|>'`` written as
    plain text) is taken verbatim as UTF-8: the decoder does the same.
    """
    if set(token) <= _ALPHABET_SET:
        return token.translate(_TO_LATIN1).encode("latin-1")
    return token.encode("utf-8")


def _sentencepiece_piece(token: str, first: bool = False) -> bytes:
    """Bytes of a SentencePiece token: ``'<0xHH>'`` is one raw byte, ``'▁'`` a space.

    ``first``: the Metaspace decoder deletes every ``'▁'`` of the first token instead of writing a space.
    """
    match = _BYTE_TOKEN.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace(_SPACE_MARK, "" if first else " ").encode("utf-8")


def _backend_config(tokenizer: Any) -> dict[str, Any] | None:
    """The ``tokenizer.json`` of a fast tokenizer as a dict; None for a slow (pure Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _flatten(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The components of a decoder / pre-tokenizer, with ``Sequence`` nodes expanded in order."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers") or []
        return [part for child in children for part in _flatten(child)]
    return [node]


def _is_space_mark_replace(node: dict[str, Any]) -> bool:
    pattern = node.get("pattern") or {}
    return node.get("type") == "Replace" and pattern.get("String") == _SPACE_MARK


def _style_from_config(config: dict[str, Any]) -> str | None:
    """Byte-level or SentencePiece from the decoder (what decoding does), else from the pre-tokenizer."""
    decoders = _flatten(config.get("decoder"))
    kinds = {d.get("type") for d in decoders}
    if "ByteLevel" in kinds:
        return BYTE_LEVEL
    if kinds & {"Metaspace", "ByteFallback"} or any(_is_space_mark_replace(d) for d in decoders):
        return SENTENCEPIECE
    pre = {p.get("type") for p in _flatten(config.get("pre_tokenizer"))}
    if "ByteLevel" in pre:
        return BYTE_LEVEL
    if "Metaspace" in pre:
        return SENTENCEPIECE
    return None


def _style_from_vocab(vocab: dict[str, int]) -> str | None:
    """Fallback for slow tokenizers: a byte-level vocabulary holds ``'Ġ'`` (the space byte) as a token."""
    if "Ġ" in vocab and _SPACE_MARK not in vocab:
        return BYTE_LEVEL
    if sum(token.startswith(_SPACE_MARK) for token in vocab) > len(vocab) // 20:
        return SENTENCEPIECE
    return None


def tokenizer_style(tokenizer: Any) -> str:
    """``'byte_level'`` or ``'sentencepiece'``; a ValueError naming the tokenizer if it is neither."""
    config = _backend_config(tokenizer)
    style = _style_from_config(config) if config is not None else None
    style = style or _style_from_vocab(tokenizer.get_vocab())
    if style is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} is neither byte-level BPE (tokens like 'Ġthe') nor SentencePiece (tokens like "
            "'▁the'): cross-tokenizer distillation cannot map its tokens to bytes"
        )
    return style


@dataclass(frozen=True)
class _ByteTable:
    """Per-tokenizer cache: the bytes and byte length of every token id, and how decoding treats the start.

    ``strip_spaces``: leading spaces a ``Strip`` decoder removes from the whole decoded text (Llama 2's
    ``Fuse`` then ``Strip(' ', 1, 0)``; a ``Strip`` is assumed to follow a ``Fuse``, as in every converter).
    ``metaspace_first``: the Metaspace decoder drops the ``'▁'`` of the first token. Both undo the dummy
    space a SentencePiece normaliser puts before the first word.
    """

    size: int
    style: str
    pieces: list[bytes | None]
    lengths: list[int]
    strip_spaces: int
    metaspace_first: bool


def _decoder_start_rules(config: dict[str, Any] | None, style: str) -> tuple[int, bool]:
    """``(strip_spaces, metaspace_first)`` for :class:`_ByteTable`, read from the decoder."""
    if style != SENTENCEPIECE:
        return 0, False
    if config is None:
        return 1, False  # a slow SentencePiece tokenizer drops the dummy-prefix space when it decodes
    strip, metaspace = 0, False
    for node in _flatten(config.get("decoder")):
        if node.get("type") == "Strip" and node.get("content") == " ":
            strip = int(node.get("start", 0))
        elif node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
            metaspace = scheme != "never"
    return strip, metaspace


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of special tokens (BOS, EOS, chat markers): they stand for no text."""
    ids = set(getattr(tokenizer, "all_special_ids", []))
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def _build_table(tokenizer: Any) -> _ByteTable:
    style = tokenizer_style(tokenizer)
    size = len(tokenizer)
    special = _special_ids(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(size)))
    to_bytes = _byte_level_piece if style == BYTE_LEVEL else _sentencepiece_piece
    pieces: list[bytes | None] = []
    for idx, token in enumerate(strings):
        if idx in special:
            pieces.append(b"")
        else:
            # A hole in the id range (possible in hand-edited vocabularies) maps to no bytes at all.
            pieces.append(None if token is None else to_bytes(token))
    lengths = [-1 if p is None else len(p) for p in pieces]
    strip, metaspace = _decoder_start_rules(_backend_config(tokenizer), style)
    return _ByteTable(size, style, pieces, lengths, strip, metaspace)


# Keyed weakly by the tokenizer object, so a cache entry dies with its tokenizer.
_TABLES: weakref.WeakKeyDictionary[Any, _ByteTable] = weakref.WeakKeyDictionary()


def _table(tokenizer: Any) -> _ByteTable:
    """The cached byte table of ``tokenizer``, rebuilt if tokens were added since it was built."""
    try:
        table = _TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable: no caching
        return _build_table(tokenizer)
    if table is None or table.size != len(tokenizer):
        table = _build_table(tokenizer)
        _TABLES[tokenizer] = table
    return table


def token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The bytes token ``token_id`` adds to decoded text in running text (not as the first token).

    Special tokens give ``b""`` (they stand for no text); an id outside the tokenizer gives None.
    """
    table = _table(tokenizer)
    return table.pieces[token_id] if 0 <= token_id < table.size else None


def _first_token_lengths(tokenizer: Any, table: _ByteTable, ids: list[int], lengths: list[int]) -> None:
    """Shorten, in place, the first tokens' lengths by what the decoder drops at the start of a text."""
    if table.metaspace_first:
        # The Metaspace decoder acts on the first token it sees; special tokens are skipped before it.
        for k, idx in enumerate(ids):
            if table.pieces[idx]:
                token = tokenizer.convert_ids_to_tokens(idx)
                lengths[k] = len(_sentencepiece_piece(token, first=True))
                break
    left = table.strip_spaces
    for k, idx in enumerate(ids):
        if left == 0:
            break
        piece = table.pieces[idx] or b""
        cut = min(left, len(piece) - len(piece.lstrip(b" ")))
        lengths[k] -= cut
        left -= cut
        if len(piece) > cut:
            break  # Strip only removes the leading run of spaces of the whole text


def token_byte_ends(tokenizer: Any, ids: list[int]) -> list[int]:
    """For each token of ``ids``, the byte offset in the UTF-8 decoded text at which that token ends.

    The text is ``tokenizer.decode(ids, skip_special_tokens=True)``: special tokens occupy no bytes, so
    they end where the previous token ended. The concatenated token bytes equal the UTF-8 bytes of that
    text whenever no character is cut at the edges of ``ids`` (byte-level tokens may split a character).

    Raises:
        ValueError: an id outside the tokenizer, or a tokenizer of neither supported style.

    """
    table = _table(tokenizer)
    try:
        lengths = [table.lengths[i] for i in ids]
    except IndexError:
        lengths = [-1]
    if min(lengths, default=0) < 0 or min(ids, default=0) < 0:
        bad = [i for i in ids if not 0 <= i < table.size or table.lengths[i] < 0]
        raise ValueError(f"token ids {bad[:5]} have no bytes in a tokenizer of {table.size} tokens")
    _first_token_lengths(tokenizer, table, ids, lengths)
    return list(accumulate(lengths))


def _last_of_each_end(ends: list[int]) -> list[int]:
    """Positions that are the last one with their end offset and still have a next token.

    Among positions that end at the same byte (a zero-byte special token after a word), the last has seen
    the most context. The final position predicts nothing inside the sequence, so it is never kept.
    """
    for k in range(1, len(ends)):
        if ends[k] < ends[k - 1]:
            raise ValueError(f"byte ends must be non-decreasing; position {k} ends at {ends[k]} < {ends[k - 1]}")
    return [k for k in range(len(ends) - 1) if ends[k + 1] != ends[k]]


def aligned_positions(student_ends: list[int], teacher_ends: list[int]) -> tuple[list[int], list[int]]:
    """Student and teacher positions at which both have read exactly the same text prefix.

    Position t of a causal LM predicts token t + 1, so at a returned pair ``(i, j)`` both models predict
    the token that starts at byte ``student_ends[i] == teacher_ends[j]``: their next-token distributions
    are about the same thing. Duplicated ends keep the last position, and only positions with a next token
    in their own sequence are returned.

    Returns:
        ``(student_positions, teacher_positions)``: equal-length, strictly increasing.

    """
    student, teacher = _last_of_each_end(student_ends), _last_of_each_end(teacher_ends)
    out_s: list[int] = []
    out_t: list[int] = []
    a = b = 0
    # Merge of two increasing offset lists: each offset appears at most once per list after de-duplication.
    while a < len(student) and b < len(teacher):
        s_end, t_end = student_ends[student[a]], teacher_ends[teacher[b]]
        if s_end == t_end:
            out_s.append(student[a])
            out_t.append(teacher[b])
        a += s_end <= t_end
        b += t_end <= s_end
    return out_s, out_t


def _bytes_to_id(tokenizer: Any) -> dict[bytes, int]:
    """Byte string → token id for the ordinary tokens of one tokenizer (no special or empty tokens).

    When two ids spell the same bytes (SentencePiece's ``'<0x41>'`` and ``'A'``), the regular token wins:
    it is the one the tokenizer emits, the byte-fallback one only appears for bytes with no other token.
    """
    table = _table(tokenizer)
    fallback_ids: set[int] = set()
    if table.style == SENTENCEPIECE:
        strings = tokenizer.convert_ids_to_tokens(list(range(table.size)))
        fallback_ids = {idx for idx, token in enumerate(strings) if token and _BYTE_TOKEN.fullmatch(token)}
    regular: dict[bytes, int] = {}
    fallback: dict[bytes, int] = {}
    for idx, piece in enumerate(table.pieces):
        if piece:  # special (b"") and unmappable (None) tokens are never shared
            (fallback if idx in fallback_ids else regular).setdefault(piece, idx)
    return {**fallback, **regular}


@dataclass(frozen=True)
class SharedVocab:
    """Tokens that spell the same bytes in the teacher's and the student's vocabularies.

    Attributes:
        teacher_ids: ``(S,)`` LongTensor of teacher token ids.
        student_ids: ``(S,)`` LongTensor of the student ids paired with them, in increasing order.
        student_vocab_size: ``len(student_tokenizer)``, for :attr:`coverage`.

    """

    teacher_ids: Tensor
    student_ids: Tensor
    student_vocab_size: int

    @classmethod
    def build(cls, teacher_tokenizer: Any, student_tokenizer: Any) -> SharedVocab:
        """Pair every ordinary token of the student with the teacher token of identical bytes, if any."""
        teacher = _bytes_to_id(teacher_tokenizer)
        pairs = sorted(
            (s_id, teacher[piece]) for piece, s_id in _bytes_to_id(student_tokenizer).items() if piece in teacher
        )
        student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        teacher_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
        return cls(teacher_ids, student_ids, len(student_tokenizer))

    @property
    def size(self) -> int:
        """S, the number of shared tokens."""
        return int(self.student_ids.numel())

    @property
    def coverage(self) -> float:
        """Fraction of the student vocabulary that is shared, ``S / len(student_tokenizer)``."""
        return self.size / max(self.student_vocab_size, 1)

    def to(self, device: torch.device | str) -> SharedVocab:
        """A copy with both id tensors on ``device`` (to move them once rather than at every step)."""
        return SharedVocab(self.teacher_ids.to(device), self.student_ids.to(device), self.student_vocab_size)


def _rest_logprob(logp: Tensor, shared: Tensor) -> Tensor:
    """``(N, 1)``: log of the total probability of the tokens not in ``shared``, NaN-free in value and gradient.

    A plain ``logsumexp`` over an all ``-inf`` set (no other token, or every other token masked) returns
    ``-inf`` but a NaN gradient, ``exp(-inf - -inf)``; here the empty sum is replaced before the log.
    """
    others = logp.index_fill(-1, shared, float("-inf"))
    top = others.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (others - top).exp().sum(-1, keepdim=True)
    positive = total > 0
    safe = torch.where(positive, total, torch.ones_like(total))
    return torch.where(positive, top + safe.log(), torch.full_like(total, float("-inf")))


def _buckets(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """``(N, S + 1)`` tempered float32 log-probabilities: each shared id, then everything else."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    ids = ids.to(logp.device)
    return torch.cat([logp.index_select(-1, ids), _rest_logprob(logp, ids)], dim=-1)


def align_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    shared: SharedVocab,
    divergence: Callable[..., Tensor],
    temperature: float,
    **kwargs: Any,
) -> Tensor:
    """A divergence between teacher and student over the shared tokens plus one bucket for the rest.

    Args:
        student_logits: ``(N, Vs)`` at aligned positions (see :func:`aligned_positions`).
        teacher_logits: ``(N, Vt)`` at the paired teacher positions.
        shared: the token pairing; its ids index the last dimension of each logits tensor.
        divergence: one of :data:`distill.objective.divergences.DIVERGENCES`, e.g. ``forward_kl``.
        temperature: the KD temperature, applied to the full vocabularies before bucketing.
        **kwargs: passed to ``divergence`` (``beta`` for ``jsd``, ``skew`` for the skew KLs).

    Returns:
        The divergence averaged over the N rows. The buckets are log-probabilities, valid logits for
        ``divergence``, which is therefore called at temperature 1: tempering already happened, before the
        rest mass was summed. An empty rest bucket (zero mass, log-probability ``-inf``) is handled without NaN
        in value or gradient; but if the student's is empty while the teacher's is not (every student token
        shared), a KL that needs the student to cover it is infinite, as it should be.

    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student = _buckets(student_logits, shared.student_ids, temperature)
    teacher = _buckets(teacher_logits, shared.teacher_ids, temperature)
    return divergence(student, teacher, None, temperature=1.0, **kwargs)


def _sorted_probs(logits: Tensor, temperature: float, width: int, top_k: int | None) -> Tensor:
    """``(N, width)``: tempered probabilities sorted descending, cut to ``top_k``, zero-padded to ``width``."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_k is not None and top_k < probs.shape[-1]:
        ranked = probs.topk(top_k, dim=-1).values  # sorted; avoids a full sort of a large vocabulary
    else:
        ranked = probs.sort(dim=-1, descending=True).values
    return F.pad(ranked, (0, width - ranked.shape[-1]))


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """Universal Logit Distillation (Boizard et al., 2024): L1 distance of the sorted probability vectors.

    Sorting forgets which token each probability belongs to, so vocabularies of any size and order can be
    compared: the student learns the shape of the teacher's distribution (how peaked, how long its tail),
    not its tokens. The shorter vocabulary is padded with zero mass.

    Args:
        student_logits: ``(N, Vs)``.
        teacher_logits: ``(N, Vt)``; no gradient flows to it.
        temperature: applied to both before the softmax.
        top_k: compare only the k largest probabilities of each (saves the full sort); None compares all.

    Returns:
        The per-row sum of absolute differences, averaged over rows (0 when N = 0).

    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 or None, got {top_k}")
    width = max(student_logits.shape[-1], teacher_logits.shape[-1])
    width = width if top_k is None else min(width, top_k)
    student = _sorted_probs(student_logits, temperature, width, top_k)
    teacher = _sorted_probs(teacher_logits.detach(), temperature, width, top_k)
    per_row = (student - teacher).abs().sum(-1)
    return per_row.sum() / max(per_row.numel(), 1)
