"""llama.cpp's importance matrix: collected on training text, read and written as ``llama-imatrix``'s ``imatrix.gguf``.

``llama-imatrix`` runs the model on calibration text and, for every matrix multiplication by a weight named
``blk.*`` (and ``output.weight`` with ``--process-output``), adds up the square of each input column over all
tokens. Its GGUF file (``tools/imatrix/imatrix.cpp``) holds, per weight, ``<name>.in_sum2`` (F32, one sum per
input column) and ``<name>.counts`` (F32, the number of tokens), sorted by name, and the keys
``general.type = imatrix``, ``imatrix.datasets`` (strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size``
(u32). ``llama-quantize --imatrix`` divides each sum by its count (a weight never reached gets ones) and weighs
every column's rounding error by the result (``tools/quantize/quantize.cpp``); its quantizers are ported in
:mod:`distill.compress.quant.llama_quants`.

The statistic itself is :func:`distill.compress.quant.type_map.collect_importance` (the mean square of each
input channel, the same one the type map weighs by); :func:`collect` turns it back into sums and a token count.
Names here are the Hugging Face modules'; the file's are llama.cpp's, given by the caller as a
``{module: tensor}`` map (the GGUF export's, :func:`distill.export.gguf.imatrix_modules`). gguf-py's writer
also stores ``general.architecture``, which llama.cpp's loader ignores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.compress.quant.type_map import collect_importance

SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass
class ImportanceMatrix:
    """What ``imatrix.gguf`` holds, by Hugging Face module name.

    Attributes:
        sums: module → F32 sum of the squared input of each column over every token (``in_sum2``).
        counts: module → the number of tokens summed (``counts``).
        datasets: where the text came from (``imatrix.datasets``).
        chunk_size: tokens per calibration row (llama-imatrix: its context).
        chunk_count: calibration rows read.

    """

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: tuple[str, ...] = ()
    chunk_size: int = 0
    chunk_count: int = 0

    def importance(self, module: str) -> np.ndarray:
        """The weight per input column llama-quantize uses: ``sum / count`` in fp32 (ones if never reached)."""
        count = np.float32(self.counts[module])
        if count <= 0:
            return np.ones_like(self.sums[module])
        return self.sums[module] / count

    def by_weight(self) -> dict[str, np.ndarray]:
        """``{"<module>.weight": importance}`` for every module, as the GGUF export takes it."""
        return {f"{m}.weight": self.importance(m) for m in self.sums}


def _counting(batches: Iterable[torch.Tensor], seen: list[torch.Size]) -> Iterator[torch.Tensor]:
    for ids in batches:
        seen.append(ids.shape)
        yield ids


def collect(
    model: nn.Module, modules: Sequence[str], batches: Iterable[torch.Tensor], dataset: str = ""
) -> ImportanceMatrix:
    """The importance matrix of ``modules`` (``nn.Linear``) of ``model`` over ``batches`` of token ids.

    Every Linear of a decoder sees each token of a batch once, so the count is the number of tokens and the
    sums are the mean squares times it.

    Args:
        model: the model, in the state it will be quantized from.
        modules: dotted names of the Linear modules to collect for.
        batches: token-id tensors ``(rows, tokens)`` (e.g. :func:`distill.compress.depth.calibration_batches`).
        dataset: a description of the text, stored as ``imatrix.datasets``.

    """
    not_linear = [m for m in modules if not isinstance(model.get_submodule(m), nn.Linear)]
    if not_linear:
        raise ValueError(f"llama-imatrix collects the inputs of matrix multiplications; {not_linear[0]} is not one")
    shapes: list[torch.Size] = []
    means = collect_importance(model, modules, _counting(batches, shapes))
    tokens = sum(s.numel() for s in shapes)
    sums = {m: (v * tokens).to(torch.float32).numpy() for m, v in means.items()}
    return ImportanceMatrix(
        sums,
        dict.fromkeys(modules, tokens),
        (dataset,) if dataset else (),
        chunk_size=int(shapes[0][-1]) if shapes else 0,
        chunk_count=sum(int(np.prod(s[:-1])) for s in shapes),
    )


def write(path: str | Path, imatrix: ImportanceMatrix, names: Mapping[str, str], arch: str = "llama") -> Path:
    """Write ``imatrix`` as ``llama-imatrix``'s GGUF file.

    Args:
        path: the file.
        imatrix: what to write.
        names: module → llama.cpp tensor name (``blk.0.attn_q.weight``) for every module of ``imatrix``.
        arch: ``general.architecture`` (gguf-py's writer always stores one; llama.cpp reads none here).

    """
    import gguf

    path = Path(path)
    missing = [m for m in imatrix.sums if m not in names]
    if missing:
        raise ValueError(f"no llama.cpp tensor name for module {missing[0]}")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.IMATRIX)
    # llama.cpp's loader needs the key; gguf-py cannot write an empty array, so an unnamed source is "".
    datasets = list(imatrix.datasets) or [""]
    writer.add_key_value(gguf.Keys.IMatrix.DATASETS, datasets, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunk_count)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
    for tensor, module in sorted((names[m], m) for m in imatrix.sums):  # llama-imatrix sorts by name
        sums = np.ascontiguousarray(imatrix.sums[module], dtype=np.float32).reshape(1, -1)
        writer.add_tensor(tensor + SUMS, sums)  # ggml's (columns, 1) shape
        writer.add_tensor(tensor + COUNTS, np.array([[imatrix.counts[module]]], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _field(reader: object, key: str) -> object:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read(path: str | Path, names: Mapping[str, str]) -> ImportanceMatrix:
    """Read ``llama-imatrix``'s GGUF file; ``names`` maps modules to tensors, entries of other tensors are skipped.

    As llama.cpp's loader: each ``in_sum2`` needs its ``counts`` and both are F32; counts are rounded to
    integers. Raises ValueError naming the file when it is not such a file.
    """
    import gguf

    path = Path(path)
    reader = gguf.GGUFReader(path)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (SUMS, COUNTS):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ValueError(f"{path}: {t.name} is {t.tensor_type.name}; an imatrix holds F32 sums and counts")
                parts.setdefault(t.name.removesuffix(suffix), {})[suffix] = np.array(t.data, np.float32).reshape(-1)
    if not parts:
        raise ValueError(f"{path} holds no <tensor>.in_sum2 / .counts pairs: not an imatrix.gguf file")
    unpaired = [n for n, p in parts.items() if len(p) != 2]
    if unpaired:
        raise ValueError(f"{path}: {unpaired[0]} has in_sum2 or counts but not both")
    by_tensor = {v: k for k, v in names.items()}
    sums, counts = {}, {}
    for tensor, p in parts.items():
        if tensor in by_tensor:
            if len(p[COUNTS]) != 1:
                raise ValueError(f"{path}: {tensor} has {len(p[COUNTS])} counts (experts); dense weights have one")
            sums[by_tensor[tensor]], counts[by_tensor[tensor]] = p[SUMS], round(float(p[COUNTS][0]))
    datasets = [d for d in _field(reader, gguf.Keys.IMatrix.DATASETS) or [] if d]
    return ImportanceMatrix(
        sums,
        counts,
        tuple(datasets),
        int(_field(reader, gguf.Keys.IMatrix.CHUNK_SIZE) or 0),
        int(_field(reader, gguf.Keys.IMatrix.CHUNK_COUNT) or 0),
    )
