"""Post-training quantization of an exported student, the baseline QAT is measured against.

    python -m distill.export.ptq model=logs/train/runs/<run>/student scheme=int8_dynact_int4_weight \
        [group_size=32] [out=<folder>] [skip='[lm_head,*embed*,*norm*]'] [modules='[linear,embedding]']
        ['module_schemes={model.embed_tokens: int4_weight_only, lm_head: int4_weight_only}']

Loads a plain Hugging Face folder, applies the scheme's torchao config with ``quantize_`` (no training,
no calibration data: the weight scales come from the weights themselves), and writes the same compact
format as the QAT callback (:func:`distill.export.quantized.save_quantized`; reload with
:func:`distill.export.quantized.load_quantized`). ``out`` defaults to ``<model>-ptq-<scheme>``.
The settings are Hydra overrides of ``conf/ptq.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from distill.compress.quant import schemes as quantization
from distill.compress.quant.sizes import size_report
from distill.config import config_error, exit_on_config_error
from distill.export.quantized import save_quantized
from distill.runtime.paths import export_root


def quantize_export(
    model_dir: str | Path,
    scheme: str,
    group_size: int | None = None,
    skip: list[str] | None = None,
    out: str | Path | None = None,
    modules: list[str] | None = None,
    module_schemes: dict | None = None,
) -> tuple[PreTrainedModel, Path]:
    """Load ``model_dir``, quantize it post-training with ``scheme`` and write the compact export.

    ``modules`` are the module kinds targeted (``linear``, ``embedding``; default Linear layers only);
    ``skip`` globs still apply to them, so quantizing the embedding also needs a skip list without ``*embed*``.
    ``module_schemes`` gives some modules another scheme (:func:`~distill.compress.quant.schemes.make_spec`).

    Returns:
        The quantized model (in memory) and the folder it was written to.

    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise config_error("model", str(model_dir), "no config.json there; give a folder written by the plain export")
    spec = quantization.make_spec(scheme, group_size, skip, modules=modules, module_schemes=module_schemes)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if (model_dir / "tokenizer_config.json").is_file() else None
    quantization.ptq(model, spec)
    out = Path(out) if out is not None else model_dir.with_name(f"{model_dir.name}-ptq-{spec.scheme}")
    save_quantized(model, tokenizer, out, spec, extra={"source": str(model_dir), "method": "ptq"})
    return model, out


def run(cfg: DictConfig) -> Path:
    """Quantize the export ``cfg`` names (``conf/ptq.yaml``) and print what was written; returns the folder."""
    for key in ("model", "scheme"):
        if OmegaConf.is_missing(cfg, key):
            raise config_error(key, None, "required: python -m distill.export.ptq model=<export folder> scheme=<name>")
    skip = OmegaConf.to_container(cfg.skip) if OmegaConf.is_config(cfg.skip) else cfg.skip
    modules = cfg.get("modules")
    modules = OmegaConf.to_container(modules) if OmegaConf.is_config(modules) else modules
    per_module = cfg.get("module_schemes")
    per_module = OmegaConf.to_container(per_module) if OmegaConf.is_config(per_module) else per_module
    model, out = quantize_export(cfg.model, cfg.scheme, cfg.group_size, skip, cfg.out, modules, per_module)
    report = size_report(model, out)
    print(
        f"wrote {out}: {int(report['quantized_weights'])} quantized weights at {report['bits_per_weight']:.2f} "
        f"stored bits each; {report['memory_bytes'] / 2**20:.2f} MiB in memory, "
        f"{report['disk_bytes'] / 2**20:.2f} MiB on disk"
    )
    return out


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="ptq")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a bad setting prints one ``error:`` line and exits with code 2."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    export_root()
    main()
