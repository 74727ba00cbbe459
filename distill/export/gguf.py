"""The student as a GGUF file for llama.cpp, written with gguf-py's writer and checked through transformers.

    python train.py export.formats=[hf,gguf] export.gguf_type=q4_0        # at the end of training
    python -m distill.export.gguf model=logs/train/runs/<run>/student type=q8_0   # any plain export
    python -m distill.export.gguf model=<export> type=iq4_nl imatrix=auto          # llama.cpp's imatrix PTQ

Architectures written (:data:`ARCHS`, one entry each, as llama.cpp's ``convert_hf_to_gguf.py`` lays them out):
Llama and Mistral as llama.cpp's ``llama`` (transformers reloads both as Llama; a Mistral sliding window
shorter than the context is refused), Qwen2 as ``qwen2`` with its q/k/v biases. Others are refused.

What is written:

- tensors under llama.cpp's names (gguf-py's ``TensorNameMap`` of the architecture); for ``llama``, the
  query and key projections' rows reordered from Hugging Face's rotate-half layout to llama.cpp's
  interleaved rotary layout (``qwen2`` keeps them: llama.cpp rotates halves for it);
- norms and biases in F32; every matrix in ``gguf_type``, except the weights a QAT callback trained on a
  llama.cpp grid (``callbacks.qat.scheme=gguf_q4_0`` etc.), which keep that grid's type and are written as
  trained;
- the byte-level BPE tokenizer (tokens, types, merges, special ids, chat template) from the student's
  Hugging Face tokenizer, so the file runs on its own.

Types are those gguf-py can quantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1), IQ4_NL and the
K-quants Q4_K, Q3_K and Q2_K (rows 256k wide), which this project encodes itself (gguf-py only decodes them):
:func:`distill.compress.quant.gguf_grid.encode_weights` keeps weights trained on a QAT grid (IQ4_NL, Q4_K,
Q3_K) as they are and rounds others as ``llama-quantize`` does (:mod:`distill.compress.quant.llama_quants`,
byte for byte). A file may mix them per tensor (``trained``: the types a QAT student trained in, or a PTQ
map). The K-quant mixes (Q4_K_M and the like) are refused with the llama.cpp command that makes them from an
F16 file.

Post-training, the rival's recipe (``llama-imatrix``, then ``llama-quantize --imatrix``) runs here: with
``importance`` (an importance-matrix row per weight: :mod:`distill.compress.quant.imatrix`, read from
``imatrix.gguf`` or collected on the training split) every matrix is rounded by llama.cpp's
importance-weighted quantizers, so the file holds the bytes ``llama-quantize --imatrix`` would write.

:func:`verify_gguf` reloads the file with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``:
its logits must equal those of the student with each tensor rounded by gguf-py itself (the function the
file holds), and its tokenizer must encode a probe text as the student's does. The drift from the student
(the quantization error) is measured and returned, not bounded.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.compress.quant import llama_quants
from distill.compress.quant.gguf_grid import ENCODED_KINDS, K_KINDS, encode_weights
from distill.config import config_error, exit_on_config_error
from distill.export.hf import compare_logits
from distill.runtime.files import atomic_directory
from distill.runtime.paths import export_root

log = logging.getLogger("distill")

FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", *K_KINDS, "q2_k", "iq4_nl")
TYPES = FLOAT_TYPES + QUANT_TYPES
# Blocks along a row: 32 for the legacy types and IQ4_NL, 256 (QK_K) for the K-quants.
BLOCKS = {t: llama_quants.BLOCKS[t] for t in QUANT_TYPES}
K_QUANTS = ("q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k", "q5_k_s", "q5_k_m", "q6_k")
# general.file_type of a file whose matrices are mostly one K-quant (llama.cpp's names for those mixes).
K_FILE_TYPES = {"q4_k": "MOSTLY_Q4_K_S", "q3_k": "MOSTLY_Q3_K_S"}
# Largest |Δlogit| between the reloaded file and the student rounded by gguf-py: both compute the same
# weights in fp32, so only summation order differs.
RELOAD_ATOL = 1e-4
PROBE_TEXT = "The capital of France is Paris. def f(x):\n    return x ** 2  # 42 émigrés"


def _qtype(name: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def _file_type(name: str) -> Any:
    import gguf

    if name == "f32":
        return gguf.LlamaFileType.ALL_F32
    return gguf.LlamaFileType[K_FILE_TYPES.get(name, f"MOSTLY_{name.upper()}")]


def encode(
    data: np.ndarray,
    gguf_type: str,
    name: str | None = None,
    importance: np.ndarray | None = None,
    stored: np.ndarray | None = None,
) -> np.ndarray:
    """``data`` as the GGUF file stores it in ``gguf_type``, as llama.cpp's own encoders write it.

    With ``importance`` (one weight per column) a quantized type gets ``llama-quantize --imatrix``'s rounding;
    without it, trained blocks on a QAT grid are kept (:func:`~distill.compress.quant.gguf_grid.encode_weights`)
    and others get ``llama-quantize``'s. A quantized type refuses inf and NaN, naming the tensor ``name``.
    ``stored``: the bytes QAT trained with learned block scales (``QuantizedStudent.gguf_blocks``), written as
    they are once checked to decode to ``data`` exactly.
    """
    import gguf

    if stored is not None:
        decoded = gguf.quants.dequantize(stored, _qtype(gguf_type)).reshape(data.shape)
        if not np.array_equal(decoded, data):
            raise RuntimeError(
                f"{name}: the {gguf_type} blocks QAT stored no longer decode to the weight (it changed after "
                "convert); export the student as converted"
            )
        return stored

    if gguf_type in QUANT_TYPES and importance is not None:
        return llama_quants.quantize(data, gguf_type, importance, name)
    if gguf_type in ENCODED_KINDS:
        return encode_weights(data, gguf_type, name)
    if gguf_type in QUANT_TYPES:
        return llama_quants.quantize(data, gguf_type, None, name)
    return gguf.quants.quantize(data, _qtype(gguf_type))


def check_type(gguf_type: str, field: str = "export.gguf_type") -> str:
    """Validate a GGUF type name; K-quants get the llama.cpp command that produces them."""
    name = str(gguf_type).lower()
    if name in K_QUANTS:
        raise config_error(
            field,
            gguf_type,
            "gguf-py's writer has no K-quant encoder; write f16 and convert it with llama.cpp: "
            f"llama-quantize student-f16.gguf student-{name}.gguf {name.upper()}",
        )
    if name not in TYPES:
        raise config_error(field, gguf_type, f"unknown GGUF type; choose one of {', '.join(TYPES)}")
    return name


def file_name(gguf_type: str) -> str:
    """The GGUF file's name inside its folder: ``student-<type>.gguf``."""
    return f"student-{gguf_type}.gguf"


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise config_error(
            "export.formats",
            "gguf",
            f"the student uses {kind} rotary scaling, which this GGUF export does not write; export hf only",
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp's converter lays out one Hugging Face architecture, as transformers' GGUF loader reads it back.

    Everything else (tensor names, hyperparameter keys) follows from :attr:`name` through gguf-py.
    """

    name: str
    """llama.cpp's architecture: ``general.architecture``, the prefix of its keys, its ``TensorNameMap``."""
    permute_qk: bool
    """Whether q/k rows are reordered to interleaved rotary pairs (transformers undoes it for ``llama`` files)."""
    biases: tuple[str, ...] = ()
    """Projections whose biases the file holds and the loader reads back; any other bias is refused."""
    reads_head_dim: bool = True
    """Whether the loader reads the head width (``rope.dimension_count``), or takes hidden / heads."""


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# By Hugging Face model_type. Mistral is llama.cpp's llama (as its converter writes it); transformers rebuilds
# it as LlamaForCausalLM, which computes the same as long as no sliding window matters (refused otherwise).
# Qwen2's rows keep Hugging Face's order: llama.cpp's qwen2 applies rotate-half (NEOX) rotary itself.
ARCHS = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2", permute_qk=False, biases=_QKV, reads_head_dim=False),
}


def gguf_arch(model: PreTrainedModel) -> GGUFArch:
    """The layout of ``model``'s architecture in a GGUF file; other architectures are refused."""
    kind = model.config.model_type
    if kind not in ARCHS:
        raise config_error(
            "export.formats",
            "gguf",
            f"the GGUF export writes {', '.join(ARCHS)} students; this one is {kind}; export hf only",
        )
    return ARCHS[kind]


def _sliding_window(config: Any) -> int | None:
    """The attention window when it is shorter than the student's context on some layer, else None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or window >= config.max_position_embeddings:
        return None
    # Qwen2 names its windowed layers; Mistral has no layer_types and windows every layer.
    return window if layer_types is None or "sliding_attention" in layer_types else None


def check_exportable(model: PreTrainedModel) -> None:
    """Refuse students whose GGUF file (as transformers' GGUF loader reloads it) would not be the student."""
    config = model.config
    arch = gguf_arch(model)
    if getattr(config, "distill_layer_shapes", None):
        # llama.cpp reads per-layer head counts and FFN widths as arrays, but transformers' GGUF loader reads
        # one width for all layers, so such a file could not be checked here; refused rather than unchecked.
        raise config_error(
            "export.formats",
            "gguf",
            "the student has per-layer pruned widths (callbacks.prune.uniform=false), which transformers' GGUF "
            "loader cannot rebuild; prune uniformly (callbacks.prune.uniform=true) for a GGUF export",
        )
    extra = [k for k in model.state_dict() if k.endswith(".bias") and not k.removesuffix(".bias").endswith(arch.biases)]
    if extra:
        # llama.cpp reads bias tensors, but transformers' GGUF loader builds the model from its config class's
        # defaults, which have none but arch.biases, so the file could not be checked here (students get
        # biases from callbacks.prune.bias_compensation).
        raise config_error(
            "export.formats",
            "gguf",
            f"the student has biases transformers' GGUF loader does not read back for {config.model_type} "
            f"({extra[0]}); set callbacks.prune.bias_compensation=false for a GGUF export",
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not arch.reads_head_dim and head_dim * config.num_attention_heads != config.hidden_size:
        raise config_error(
            "export.formats",
            "gguf",
            f"the student's heads are {head_dim} wide, not hidden_size / heads ({config.hidden_size} / "
            f"{config.num_attention_heads}: what pruning heads or the hidden width leaves), and transformers' GGUF "
            f"loader takes that ratio for {config.model_type}; set callbacks.prune.heads=null and "
            "callbacks.prune.hidden=null for a GGUF export, or export hf only",
        )
    window = _sliding_window(config)
    if window is not None:
        raise config_error(
            "export.formats",
            "gguf",
            f"the student attends within a sliding window of {window} tokens, shorter than its "
            f"{config.max_position_embeddings}-token context, and llama.cpp's {arch.name} file has no window "
            "(nor does transformers' GGUF loader read one); give the student sliding_window=null or export hf only",
        )
    _rope_theta(config)


def check_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gguf_type: str = "auto") -> None:
    """Everything :func:`write_gguf` would refuse about this student, checked before training."""
    check_exportable(model)
    _check_tokenizer(tokenizer)
    if gguf_type != "auto":
        tensor_types(model, check_type(gguf_type))


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokens(tokenizer: PreTrainedTokenizerBase, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types, padded to the embedding's rows."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise config_error(
            "export.formats",
            "gguf",
            f"the tokenizer has ids up to {max(vocab.values())} but the student's embedding has {n_vocab} rows; "
            "export with the tokenizer the student was trained with",
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    kind = (spec.get("model") or {}).get("type")
    if kind != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise config_error(
            "export.formats",
            "gguf",
            f"the GGUF export embeds byte-level BPE tokenizers (llama.cpp's gpt2 type); this one is "
            f"{kind or type(tokenizer).__name__}; export hf only",
        )


def tensor_types(model: PreTrainedModel, gguf_type: str, trained: Mapping[str, str] | None = None) -> dict[str, str]:
    """The GGUF type of each tensor: norms and biases F32, weights in ``trained`` that type, others ``gguf_type``.

    ``trained`` holds the types a QAT grid trained in, or a PTQ map's (:func:`glob_types`). A tied head takes its
    embedding's type when the embedding has one there: they are one tensor in the file.
    """
    trained = dict(trained or {})
    if _tied(model):
        embedding = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        if embedding in trained:
            trained["lm_head.weight"] = trained[embedding]
    out = {}
    for name, tensor in model.state_dict().items():
        if tensor.dim() < 2:
            out[name] = "f32"
        else:
            out[name] = trained.get(name, gguf_type)
        block = BLOCKS.get(out[name])
        if block is not None and tensor.shape[-1] % block:
            fits = [t for t in QUANT_TYPES if tensor.shape[-1] % BLOCKS[t] == 0] + list(FLOAT_TYPES)
            other = ", ".join(fits[:-1]) + f" or {fits[-1]}"
            raise config_error(
                "export.gguf_type",
                out[name],
                f"{name} has rows {tensor.shape[-1]} wide, not a multiple of {out[name]}'s blocks of {block}; "
                f"use {other}",
            )
    return out


def _tied(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _write_hparams(writer: Any, model: PreTrainedModel, gguf_type: str) -> None:
    """llama.cpp's ``<arch>.*`` keys from the student's config (the writer prefixes its architecture)."""
    import gguf

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # pruned heads leave head_dim != hidden / heads
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, n_vocab: int, pre: str) -> None:
    """The byte-level BPE tokenizer: tokens, types, merges, special ids and chat template."""
    import gguf

    tokens, token_types = _tokens(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    with tempfile.TemporaryDirectory() as tok_dir:
        # gguf-py's SpecialVocab reads merges, special ids, add_bos/eos and the chat template from the
        # Hugging Face files, as llama.cpp's converter does.
        tokenizer.save_pretrained(tok_dir)
        gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def tensor_names(model: PreTrainedModel) -> dict[str, str]:
    """llama.cpp's name (``blk.0.attn_q.weight``) of every tensor the file holds, by state-dict key.

    A tied head has none: llama.cpp and transformers reuse ``token_embd``.
    """
    import gguf

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch(model).name]
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    tied = _tied(model)
    out = {}
    for key in model.state_dict():
        if tied and key == "lm_head.weight":
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise config_error(
                "export.formats", "gguf", f"the student's tensor {key} has no llama.cpp name; export hf only"
            )
        out[key] = target
    return out


def imatrix_modules(model: PreTrainedModel, output: bool = False) -> dict[str, str]:
    """The Linear modules ``llama-imatrix`` collects for, by module name, with their tensor names.

    Every ``blk.*`` matrix, and with ``output`` (its ``--process-output``) an untied head (``output.weight``;
    a tied head is ``token_embd``, which it never collects).
    """
    out = {}
    for key, name in tensor_names(model).items():
        module = key.removesuffix(".weight")
        wanted = name.startswith("blk.") or (output and name == "output.weight")
        if wanted and key.endswith(".weight") and isinstance(model.get_submodule(module), torch.nn.Linear):
            out[module] = name
    return out


def _add_tensors(
    writer: Any,
    model: PreTrainedModel,
    types: Mapping[str, str],
    arch: GGUFArch,
    importance: Mapping[str, np.ndarray],
    stored: Mapping[str, np.ndarray],
) -> None:
    """Every tensor under llama.cpp's name, encoded in its type; q/k rows in the arch's rotary order."""
    config = model.config
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads} if arch.permute_qk else {}
    state = model.state_dict()
    for key, target in tensor_names(model).items():
        data = state[key].detach().to(torch.float32).cpu().numpy()
        blocks = stored.get(key)
        projection = key.rsplit(".", 2)[-2]
        if ".self_attn." in key and projection in heads:
            data = _permute_rows(data, heads[projection])  # a bias's entries are rows too (importance: columns)
            blocks = None if blocks is None else _permute_rows(blocks, heads[projection])  # blocks lie in rows
        qtype = _qtype(types[key])
        raw = None if types[key] in ("f32", "f16") else qtype  # the writer infers those two from the array
        writer.add_tensor(target, encode(data, types[key], key, importance.get(key), blocks), raw_dtype=raw)


def write_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    gguf_type: str = "f16",
    trained: Mapping[str, str] | None = None,
    pre: str = "default",
    name: str = "distill-student",
    verify: Callable[[Path], Any] | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    stored: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as ``out_dir/student-<type>.gguf``; returns the file.

    Args:
        model: a plain student of an architecture in :data:`ARCHS` (shared, factorised and quantized
            weights made plain).
        tokenizer: its byte-level BPE tokenizer.
        out_dir: the folder to publish; it is assembled next to it and swapped in only when complete.
        gguf_type: the type of every matrix not in ``trained`` (see :data:`TYPES`).
        trained: ``{weight name: type}`` for weights a QAT callback trained on a llama.cpp grid, or a PTQ
            type map (:func:`glob_types`).
        pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``): how text is split before the merges.
        name: ``general.name``.
        verify: called with the written file before the folder is published; raising keeps the old folder
            (:func:`export_gguf` passes :func:`verify_gguf`).
        importance: ``{weight name: one weight per input column}`` (an importance matrix,
            :meth:`~distill.compress.quant.imatrix.ImportanceMatrix.by_weight`): those weights are rounded as
            ``llama-quantize --imatrix`` rounds them. For untrained weights: it re-rounds a QAT grid's.
        stored: ``{weight name: ggml bytes}`` of weights QAT trained with learned block scales, written as they are.

    """
    import gguf

    gguf_type = check_type(gguf_type)
    check_exportable(model)
    arch = gguf_arch(model)
    _check_tokenizer(tokenizer)
    types = tensor_types(model, gguf_type, trained)
    with atomic_directory(out_dir) as tmp:
        writer = gguf.GGUFWriter(tmp / file_name(gguf_type), arch.name)
        writer.add_name(name)
        _write_hparams(writer, model, gguf_type)
        _write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0], pre)
        _add_tensors(writer, model, types, arch, importance or {}, stored or {})
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if verify is not None:
            verify(tmp / file_name(gguf_type))
    return Path(out_dir) / file_name(gguf_type)


def export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    gguf_type: str = "f16",
    trained: Mapping[str, str] | None = None,
    pre: str = "default",
    name: str = "distill-student",
    importance: Mapping[str, np.ndarray] | None = None,
    stored: Mapping[str, np.ndarray] | None = None,
) -> GGUFCheck:
    """:func:`write_gguf`, checked by :func:`verify_gguf` before the folder is published; returns the check."""
    checks: list[GGUFCheck] = []
    gguf_type = check_type(gguf_type)

    def check(path: Path) -> None:
        checks.append(verify_gguf(model, tokenizer, path, gguf_type, trained, importance, stored))

    file = write_gguf(
        model,
        tokenizer,
        out_dir,
        gguf_type,
        trained,
        pre=pre,
        name=name,
        verify=check,
        importance=importance,
        stored=stored,
    )
    return dataclasses.replace(checks[0], file=file)


@torch.no_grad()
def rounded_copy(
    model: PreTrainedModel,
    types: Mapping[str, str],
    importance: Mapping[str, np.ndarray] | None = None,
    stored: Mapping[str, np.ndarray] | None = None,
) -> PreTrainedModel:
    """A copy of ``model`` whose tensors are rounded to their GGUF types and decoded by gguf-py: what the file holds.

    ``importance`` and ``stored`` (by weight name) are what :func:`write_gguf` was given.
    """
    import gguf

    # .to, not .float: transformers refuses .float() on a model loaded from GGUF (it counts as quantized).
    out = copy.deepcopy(model).to(torch.float32)  # the file is read back in fp32, whatever the student trained in
    state = out.state_dict(keep_vars=True)
    done: set[int] = set()
    for key, param in state.items():
        if id(param) in done:
            continue
        done.add(id(param))
        qtype = _qtype(types[key])
        data = param.detach().to(torch.float32).cpu().numpy()
        blocks = encode(data, types[key], key, (importance or {}).get(key), (stored or {}).get(key))
        values = gguf.quants.dequantize(blocks, qtype)  # gguf-py's decoder reads every type
        param.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(param.shape))
    return out


def same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, n_vocab: int) -> bool:
    """Whether two tokenizers map the model's ids to the same tokens and split a probe text the same way.

    transformers rebuilds a GGUF file's BPE tokenizer as a GPT-2 tokenizer, which adds ``<|endoftext|>``
    after the vocabulary when the file has none; ids past the model's rows are therefore not compared.
    """

    def within(t: PreTrainedTokenizerBase) -> dict[str, int]:
        return {k: v for k, v in t.get_vocab().items() if v < n_vocab}

    return within(a) == within(b) and a(PROBE_TEXT)["input_ids"] == b(PROBE_TEXT)["input_ids"]


@dataclass(frozen=True)
class GGUFCheck:
    """What :func:`verify_gguf` measured."""

    file: Path
    bytes: int
    reload_max_abs_diff: float  # reloaded file vs the student rounded by gguf-py
    drift_max_abs_logit: float  # reloaded file vs the student itself: the quantization error
    drift_top1_agreement: float  # share of probe positions where the file's argmax is the student's
    tokenizer_matches: bool


@torch.no_grad()
def verify_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    file: str | Path,
    gguf_type: str,
    trained: Mapping[str, str] | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
    stored: Mapping[str, np.ndarray] | None = None,
) -> GGUFCheck:
    """Reload ``file`` with plain transformers and check it is the student in the types it was written in.

    Raises when the reloaded logits differ from the gguf-py-rounded student by more than
    :data:`RELOAD_ATOL` (a wrong name, layout or type). The tokenizer check only warns: llama.cpp's and
    transformers' pre-tokenizers for a name that neither knows fall back to GPT-2's split, which a
    student's own tokenizer may not use.
    """
    file = Path(file)
    reloaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    expected = rounded_copy(model, tensor_types(model, gguf_type, trained), importance, stored).eval()
    diff = compare_logits(expected, reloaded, f"GGUF export at {file}", atol=RELOAD_ATOL)
    vocab = model.get_output_embeddings().weight.shape[0]
    probe = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        want = model(input_ids=probe.to(device)).logits.float().cpu()
    finally:
        model.train(was_training)
    got = reloaded.to(device)(input_ids=probe.to(device)).logits.float().cpu()
    reloaded_tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    matches = same_tokenization(reloaded_tok, tokenizer, vocab)
    if not matches:
        log.warning(
            "the tokenizer read back from %s splits text differently from the student's; set export.gguf_pre to "
            "llama.cpp's name for this tokenizer's pre-tokenizer",
            file,
        )
    return GGUFCheck(
        file=file,
        bytes=file.stat().st_size,
        reload_max_abs_diff=diff,
        drift_max_abs_logit=float((want - got).abs().max()),
        drift_top1_agreement=float((want.argmax(-1) == got.argmax(-1)).float().mean()),
        tokenizer_matches=matches,
    )


def source_pre(folder: str | Path | None, gguf_file: str | None) -> str | None:
    """``tokenizer.ggml.pre`` of a GGUF file (a GGUF teacher's), or None when there is none."""
    if not folder or not gguf_file or not (Path(folder) / gguf_file).is_file():
        return None
    import gguf

    field = gguf.GGUFReader(Path(folder) / gguf_file).get_field("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def teacher_pre(teacher: Any) -> str:
    """llama.cpp's pre-tokenizer name for a student that kept its teacher's tokenizer.

    The teacher's own ``tokenizer.ggml.pre`` when it was loaded from a GGUF file (``smollm`` for the
    embedded SmolLM2), else ``default``.
    """
    gguf_file = teacher.get("gguf_file")
    if not gguf_file or not (teacher.get("path") or teacher.get("package")):
        return "default"
    from distill.models.loading import resolve_source

    return source_pre(resolve_source(teacher.get("path"), teacher.get("package"), gguf_file, "teacher"), gguf_file) or (
        "default"
    )


def glob_types(model: PreTrainedModel, types: Mapping[str, str] | None, field: str = "types") -> dict[str, str]:
    """``{weight name: type}`` for the matrices whose module matches a glob of ``types`` (``{glob: type}``).

    The last matching glob wins (as ``callbacks.qat.gguf_types``); a glob that matches no matrix and an unknown
    type are refused. A tied head is its embedding's tensor and takes the embedding's type (:func:`tensor_types`).
    """
    import fnmatch

    globs = {str(g): check_type(t, field) for g, t in (types or {}).items()}
    matrices = [k.removesuffix(".weight") for k, v in model.state_dict().items() if v.dim() >= 2]
    for glob, kind in globs.items():
        if not any(fnmatch.fnmatchcase(m, glob) for m in matrices):
            raise config_error(field, {glob: kind}, "the glob matches no weight matrix; check the module names")
    out = {}
    for module in matrices:
        for glob, kind in globs.items():
            if fnmatch.fnmatchcase(module, glob):
                out[f"{module}.weight"] = kind
    return out


def ptq_importance(cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The importance matrix ``cfg.imatrix`` names: an ``imatrix.gguf`` file's, or with ``auto`` collected here.

    ``auto`` runs the model on ``cfg.imatrix_batches`` batches of 4 rows of the training split of ``cfg.data``
    (tokenized with the model's tokenizer), as ``llama-imatrix`` would on that text.
    """
    from distill.compress.quant import imatrix

    modules = imatrix_modules(model, output=bool(cfg.imatrix_output))
    if str(cfg.imatrix) != "auto":
        path = Path(str(cfg.imatrix))
        if not path.is_file():
            raise config_error("imatrix", str(path), "no such file; give llama-imatrix's imatrix.gguf, or auto")
        try:
            found = imatrix.read(path, modules)
        except ValueError as err:
            raise config_error("imatrix", str(path), str(err)) from None
        for module, sums in found.sums.items():
            width = model.get_submodule(module).in_features
            if sums.shape != (width,):
                raise config_error(
                    "imatrix", str(path), f"{modules[module]} has {sums.size} sums but the model's has {width} columns"
                )
        return found
    from distill.compress.depth import calibration_batches
    from distill.config import build

    datamodule = build(cfg.data, "data", tokenizer=tokenizer)
    datamodule.setup("fit")
    rows = calibration_batches(
        datamodule.train_set, batches=int(cfg.imatrix_batches), rows=4, tokens=datamodule.block_size
    )
    source = f"distill {cfg.data.get('source', 'data')} training split: {sum(len(r) for r in rows)} rows"
    return imatrix.collect(model, list(modules), rows, source)


def run(cfg: DictConfig) -> GGUFCheck:
    """Write and verify the GGUF file of the plain export ``cfg.model`` (``conf/gguf.yaml``).

    With ``cfg.types`` (``{module glob: type}``) the matching matrices take those types; with ``cfg.imatrix``
    every weight the importance matrix covers is rounded as ``llama-quantize --imatrix`` does, and a collected
    matrix is written next to the file as ``imatrix.gguf`` (for llama-quantize itself).
    """
    if OmegaConf.is_missing(cfg, "model"):
        raise config_error("model", None, "required: python -m distill.export.gguf model=<export folder> type=q8_0")
    model_dir = Path(cfg.model)
    if not (model_dir / "config.json").is_file():
        raise config_error("model", str(model_dir), "no config.json there; give a folder written by the plain export")
    gguf_type = check_type(cfg.type, "type")
    from distill.models.loading import load_causal_lm  # reads per-layer pruned exports too (then refused below)

    model = load_causal_lm(str(model_dir), dtype="float32", field="model").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_exportable(model)
    types = glob_types(model, cfg.get("types"))
    found = ptq_importance(cfg, model, tokenizer) if cfg.get("imatrix") else None
    out = Path(cfg.out) if cfg.out else model_dir.with_name(f"{model_dir.name}-gguf-{gguf_type}")
    importance = found.by_weight() if found is not None else None
    check = export_gguf(
        model, tokenizer, out, gguf_type, types, pre=cfg.pre, name=model_dir.name, importance=importance
    )
    if found is not None and str(cfg.imatrix) == "auto":
        from distill.compress.quant import imatrix

        names = imatrix_modules(model, bool(cfg.imatrix_output))
        imatrix.write(out / "imatrix.gguf", found, names, gguf_arch(model).name)
    weighted = f"; {len(importance)} matrices importance-weighted ({cfg.imatrix})" if importance else ""
    print(
        f"wrote {check.file}: {check.bytes / 2**20:.2f} MiB{weighted}; reload matches the rounded model to "
        f"{check.reload_max_abs_diff:.2g}; against the unrounded model max |Δlogit| {check.drift_max_abs_logit:.3g}, "
        f"top-1 agreement {check.drift_top1_agreement:.3f} on a random probe"
    )
    return check


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="gguf")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    export_root()
    main()
