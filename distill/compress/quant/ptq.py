"""Post-training quantization of an exported student, the baseline QAT is measured against.

    python -m distill.compress.quant.ptq model=logs/train/runs/<run>/student scheme=int8_dynact_int4_weight [group_size=32]
        [out=<folder>] [skip='[lm_head,*embed*,*norm*]']

Loads a plain Hugging Face folder, applies the scheme's torchao config with ``quantize_`` (no training,
no calibration data: the weight scales come from the weights themselves), and writes the same compact
format as the QAT callback (:func:`distill.compress.quant.schemes.save_quantized`; reload with
:func:`distill.compress.quant.schemes.load_quantized`). ``out`` defaults to ``<model>-ptq-<scheme>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from distill.compress.quant import schemes as quantization
from distill.config import ConfigError, config_error

KEYS = ("model", "scheme", "group_size", "out", "skip")


def parse_args(argv: list[str]) -> dict[str, object]:
    """``key=value`` arguments (values parsed as YAML, so ``group_size=64`` is an int and lists work)."""
    args: dict[str, object] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise config_error("argument", item, f"give key=value with key one of {', '.join(KEYS)}")
        args[key] = yaml.safe_load(value) if key in ("group_size", "skip") else value
    for key in ("model", "scheme"):
        if key not in args:
            raise config_error(
                key, None, "required: python -m distill.compress.quant.ptq model=<export folder> scheme=<name>"
            )
    return args


def quantize_export(
    model_dir: str | Path,
    scheme: str,
    group_size: int | None = None,
    skip: list[str] | None = None,
    out: str | Path | None = None,
) -> tuple[PreTrainedModel, Path]:
    """Load ``model_dir``, quantize it post-training with ``scheme`` and write the compact export.

    Returns:
        The quantized model (in memory) and the folder it was written to.

    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise config_error("model", str(model_dir), "no config.json there; give a folder written by the plain export")
    spec = quantization.make_spec(scheme, group_size, skip)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if (model_dir / "tokenizer_config.json").is_file() else None
    quantization.ptq(model, spec)
    out = Path(out) if out is not None else model_dir.with_name(f"{model_dir.name}-ptq-{spec.scheme}")
    quantization.save_quantized(model, tokenizer, out, spec, extra={"source": str(model_dir), "method": "ptq"})
    return model, out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; a bad argument prints one ``error:`` line and returns 2."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        model, out = quantize_export(
            args["model"], args["scheme"], args.get("group_size"), args.get("skip"), args.get("out")
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = quantization.size_report(model, out)
    print(
        f"wrote {out}: {int(report['quantized_weights'])} quantized weights at {report['bits_per_weight']:.2f} "
        f"stored bits each; {report['memory_bytes'] / 2**20:.2f} MiB in memory, "
        f"{report['disk_bytes'] / 2**20:.2f} MiB on disk"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
