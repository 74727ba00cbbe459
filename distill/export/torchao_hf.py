"""The quantized student as a transformers-native torchao folder: ``from_pretrained`` loads it with no code from here.

    python train.py experiment=qad_int4 export.formats=[hf,torchao]     # writes <run>/student_torchao/

The folder is what transformers itself writes for a ``TorchAoConfig`` model: ``config.json`` carries the
``quantization_config`` (the torchao config of the scheme), and ``model.safetensors`` holds torchao's
flattened tensor subclasses (``IntxUnpackedToInt8Tensor``: int8 codes, scales, zero points). Plain
``AutoModelForCausalLM.from_pretrained(folder)`` then rebuilds the same quantized tensors; it needs torchao
installed, as any torchao checkpoint does. A tied embedding/head is stored once and tied again on load.

It differs from :mod:`distill.export.quantized` (``student_quantized/``) in one way: that format packs
sub-byte codes to their width on disk and needs :func:`~distill.export.quantized.load_quantized`; this one
keeps one code per byte, which is what transformers' torchao loader reads, so an int4 file is about twice
as large.
"""

from __future__ import annotations

import copy
from pathlib import Path

from safetensors.torch import save_file
from torchao.core.config import AOBaseConfig
from torchao.quantization import FqnToConfig
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, TorchAoConfig

from distill.compress.quant.schemes import MODULE_KINDS, QuantSpec, is_quantized
from distill.export.hf import compare_logits
from distill.export.quantized import flatten_quantized
from distill.runtime.files import atomic_directory

WEIGHTS_FILE = "model.safetensors"


def _left_alone(model: PreTrainedModel) -> list[str]:
    """Linear and Embedding modules whose weight was not quantized: transformers must leave them as they are."""
    kinds = tuple(MODULE_KINDS.values())
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and not is_quantized(m.weight)]


def quant_type(model: PreTrainedModel, spec: QuantSpec) -> AOBaseConfig:
    """The spec's torchao config; with ``module_schemes``, torchao's ``FqnToConfig`` naming each quantized module."""
    if not spec.module_schemes:
        return spec.base_config()
    by_name = {}
    for config, keep in spec.applications():
        by_name.update({name: config for name, m in model.named_modules() if keep(m, name)})
    return FqnToConfig(by_name)


def save_transformers_torchao(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path, spec: QuantSpec
) -> Path:
    """Write ``model`` (quantized in place by QAT convert or PTQ with ``spec``) for plain ``from_pretrained``.

    Assembled next to ``out_dir`` and swapped in only when complete; before that it is loaded back with
    plain ``AutoModelForCausalLM`` and its logits must equal the model's exactly.
    """
    with atomic_directory(out_dir) as tmp:
        tensors, metadata, tied = flatten_quantized(model)
        head = model.get_output_embeddings()
        if tied and not (tied == ["lm_head.weight"] and head is not None and model.config.tie_word_embeddings):
            raise RuntimeError(f"shared quantized tensors other than a tied head ({tied}) have no transformers form")
        save_file(tensors, tmp / WEIGHTS_FILE, metadata=metadata)
        config = copy.deepcopy(model.config)
        config.quantization_config = TorchAoConfig(
            quant_type=quant_type(model, spec),
            include_input_output_embeddings="embedding" in spec.modules,
            modules_to_not_convert=_left_alone(model),
        )
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        compare_logits(model, reloaded, f"transformers torchao export at {out_dir}", atol=0.0)
    return Path(out_dir)
