"""A training batch seen through two tokenizers: the teacher's tokens for the student's text, and the pairs.

The data is tokenised with the student's tokenizer (the student is what trains, is exported and generates). Each
step, every row's student tokens are turned back into the text's bytes, the teacher's tokenizer reads the same
text, and the positions where both models have read the same bytes are paired
(:func:`~distill.objective.cross_tokenizer.aligned_positions`). The KD term compares the two models there only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from distill.config import config_error
from distill.objective.cross_tokenizer import SharedVocab, aligned_positions, token_byte_ends, token_bytes
from distill.objective.divergences import IGNORE_INDEX

METHODS = ("uld", "align")


@dataclass
class AlignedBatch:
    """The teacher's view of a student batch, and where the two line up.

    Attributes:
        teacher_ids: ``(B, Tt)`` the teacher's tokens of each row's text, right-padded.
        teacher_mask: ``(B, Tt)`` 1 on real tokens.
        student_rows: ``(N,)`` flat indices into the student's ``(B·Ts)`` positions.
        teacher_rows: ``(N,)`` the paired flat indices into the teacher's ``(B·Tt)`` positions.
        pair_bytes: ``(N,)`` how many bytes of its row's text both models have read at each pair.

    """

    teacher_ids: Tensor
    teacher_mask: Tensor
    student_rows: Tensor
    teacher_rows: Tensor
    pair_bytes: Tensor


def _utf8_window(raw: bytes, ends: list[int]) -> tuple[int, int]:
    """The widest span between token boundaries that is valid UTF-8 text.

    A packed row may start or stop inside a character that a byte-level token split; those few bytes have no
    text, so no teacher token can cover them.
    """
    bounds = [0, *ends]
    start = next((b for b in bounds if b < len(raw) and (raw[b] & 0xC0) != 0x80), len(raw))
    for stop in sorted({b for b in bounds if b > start}, reverse=True):
        try:
            raw[start:stop].decode("utf-8")
            return start, stop
        except UnicodeDecodeError:
            continue
    return start, start


def _spelled(tokenizer: PreTrainedTokenizerBase, ids: list[int], ends: list[int]) -> bytes:
    """The bytes ``ids`` stand for by their byte ``ends`` (:func:`token_byte_ends` of ``ids``).

    Each token adds the last ``end - previous end`` bytes of its running-text bytes: a decoder only ever drops
    the leading space or ``'▁'`` of the first tokens.
    """
    out, previous = [], 0
    for token, end in zip(ids, ends, strict=True):
        piece, length = token_bytes(tokenizer, token) or b"", end - previous
        out.append(piece[len(piece) - length :] if length > 0 else b"")
        previous = end
    return b"".join(out)


class CrossTokenizer:
    """Pairs positions of a student batch with the teacher's tokenisation of the same text.

    Args:
        method: ``uld`` (sorted probability vectors, no vocabulary mapping) or ``align`` (the shared tokens plus
            one bucket for the rest).
        teacher_tokenizer: the teacher's tokenizer.
        student_tokenizer: the student's (and the data's) tokenizer.

    """

    def __init__(
        self, method: str, teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
    ) -> None:
        if method not in METHODS:
            raise config_error("distill.objective.cross_tokenizer", method, f"choose one of {', '.join(METHODS)}")
        self.method, self.teacher_tok, self.student_tok = method, teacher_tokenizer, student_tokenizer
        self.shared = SharedVocab.build(teacher_tokenizer, student_tokenizer) if method == "align" else None
        pad = teacher_tokenizer.pad_token_id
        self.teacher_pad = pad if pad is not None else teacher_tokenizer.eos_token_id

    def _row(self, ids: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
        """(teacher ids, student positions, teacher positions, their byte offsets) for one row's real tokens."""
        s_ends = token_byte_ends(self.student_tok, ids)
        raw = b"".join(token_bytes(self.student_tok, i) or b"" for i in ids)
        raw = raw[len(raw) - s_ends[-1] :] if s_ends else b""  # a SentencePiece decoder drops one leading space
        start, stop = _utf8_window(raw, s_ends)
        if stop <= start:
            return [], [], [], []
        eos = self.student_tok.eos_token_id
        cuts = [s_ends[i] for i, t in enumerate(ids) if t == eos and start <= s_ends[i] <= stop]
        t_ids, t_ends = self._teacher_tokens(raw, start, stop, cuts)
        s_pos, t_pos = aligned_positions(s_ends, t_ends)
        return t_ids, s_pos, t_pos, [s_ends[i] for i in s_pos]

    def _teacher_tokens(self, raw: bytes, start: int, stop: int, cuts: list[int]) -> tuple[list[int], list[int]]:
        """The teacher's tokens of ``raw[start:stop]`` and their byte ends, its EOS wherever the student has one.

        ``cuts`` are the byte offsets of the student's EOS tokens. Packed rows join documents with EOS, which
        spells no bytes: read as plain text, the two documents would run together on the teacher's side, and the
        student would be taught to continue the previous document right after its EOS. Each document is read
        separately instead, and the EOS positions pair with each other. Text that looks like a special token
        (``<|endoftext|>`` in prose) is read as text (``split_special_tokens``), so it keeps its bytes. Each
        document's byte ends are found on their own, since a SentencePiece tokenizer puts a dummy space before
        each text it reads.

        Raises:
            ValueError: the teacher's tokens of a document spell other bytes than the document (a normaliser:
                NFKC ligatures, lower-casing, a decoder that drops a ``'▁'``). Checked for every document of the
                row: a length change in one document would shift the byte ends of every later one.

        """
        t_eos = self.teacher_tok.eos_token_id
        ids: list[int] = []
        ends: list[int] = []
        pos = start
        for cut in [*cuts, None]:
            end = stop if cut is None else cut
            if end > pos:
                text = raw[pos:end].decode("utf-8")
                part = self.teacher_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                part_ends = token_byte_ends(self.teacher_tok, part)
                self._check_spelling(raw[pos:end], part, part_ends)
                ids += part
                ends += [pos + e for e in part_ends]
                pos = end
            if cut is not None and t_eos is not None:
                ids.append(t_eos)
                ends.append(pos)
        return ids, ends

    def _check_spelling(self, document: bytes, ids: list[int], ends: list[int]) -> None:
        """Raise unless the teacher's tokens ``ids``, cut at their byte ``ends``, spell exactly ``document``."""
        spelled = _spelled(self.teacher_tok, ids, ends)
        if spelled == document:
            return
        pairs = zip(document, spelled, strict=False)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(document), len(spelled)))
        window = slice(max(at - 12, 0), at + 12)
        raise ValueError(
            f"teacher tokenizer {self.teacher_tok.name_or_path!r} changes the text it reads (a normaliser): "
            f"{document[window].decode(errors='replace')!r} becomes {spelled[window].decode(errors='replace')!r} "
            f"({len(document)} bytes become {len(spelled)} in that document), so its tokens cannot be placed on the "
            "student's bytes; distill.objective.cross_tokenizer needs a teacher tokenizer without normalisation"
        )

    def align(self, input_ids: Tensor, kd_labels: Tensor) -> AlignedBatch:
        """The teacher batch and the position pairs; only student positions whose next token is a KD target pair."""
        rows = []
        for b in range(input_ids.shape[0]):
            real = int((kd_labels[b] != IGNORE_INDEX).sum())  # real tokens are a prefix (right padding)
            rows.append(self._row(input_ids[b, :real].tolist()) if real > 1 else ([], [], [], []))
        width = max(2, max(len(r[0]) for r in rows))
        t_ids = torch.full((len(rows), width), self.teacher_pad, dtype=torch.long)
        t_mask = torch.zeros_like(t_ids)
        s_flat, t_flat, offsets = [], [], []
        for b, (ids, s_pos, t_pos, at) in enumerate(rows):
            t_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            t_mask[b, : len(ids)] = 1
            s_flat += [b * input_ids.shape[1] + i for i in s_pos]
            t_flat += [b * width + j for j in t_pos]
            offsets += at
        device = input_ids.device
        return AlignedBatch(
            t_ids.to(device),
            t_mask.to(device),
            torch.tensor(s_flat, dtype=torch.long, device=device),
            torch.tensor(t_flat, dtype=torch.long, device=device),
            torch.tensor(offsets, dtype=torch.long, device=device),
        )
