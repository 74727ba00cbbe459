"""Where int3's error comes from: the tied embedding/output head against the layers, with no training.

SmolLM2-135M's token table (49,152 × 576) is 21 % of its weights and is also its output head, so every logit
goes through it. This rounds the embedded teacher with torchao's weight-only grids in a few ways, one part at a
time (the rest left in fp32), and scores each against the teacher on validation batches (never the test split):

- ``everything_int3_g192``: every Linear and the table at int3 in groups of 192 (``ptq_int3_g192``'s grid);
- ``layers_int3_g192``: the layers alone at int3 (table exact); ``table_<grid>``: the table alone at ``<grid>``;
- ``layers_int3_g192_table_int4_g96``: ``experiment=qad_int3_emb4``'s grids at full depth.

Each row gives the table's stored bits per weight (codes at their width, one scale and zero point per group, as
:func:`distill.export.quantized.save_quantized` writes them) and top-1 agreement and KL with the teacher, with 95 %
intervals over documents. The split between the table and the layers is what ``module_schemes`` acts on
(docs/qat.md).

    python -m bench.table_bits [batches=12]

Writes ``bench/results/table_bits.{json,md}``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from distill.config import exit_on_config_error

# label → (layers' grid, table's grid); a grid is (torchao scheme, group size), None leaves that part exact.
VARIANTS: dict[str, tuple[tuple[str, int] | None, tuple[str, int] | None]] = {
    "everything_int3_g192": (("int3_weight_only", 192), ("int3_weight_only", 192)),
    "layers_int3_g192": (("int3_weight_only", 192), None),
    "table_int3_g192": (None, ("int3_weight_only", 192)),
    "table_int4_g192": (None, ("int4_weight_only", 192)),
    "table_int4_g96": (None, ("int4_weight_only", 96)),
    "table_int4_g32": (None, ("int4_weight_only", 32)),
    "table_int5_g192": (None, ("int5_weight_only", 192)),
    "layers_int3_g192_table_int4_g96": (("int3_weight_only", 192), ("int4_weight_only", 96)),
}


def variant_spec(layers: tuple[str, int] | None, table: tuple[str, int] | None) -> Any:
    """The PTQ spec of one variant: the layers' grid as the scheme, the table's as ``module_schemes``."""
    from bench.studies.baselines import TABLE, table_schemes
    from distill.compress.quant import schemes

    if layers is None:  # the table alone: every Linear but the head skipped
        return schemes.make_spec(table[0], table[1], ["*norm*", "*layers*"], "", ["linear", "embedding"])
    skip = ["*norm*"] if table else ["*norm*", *TABLE]
    per_module = table_schemes(table) if table else None
    return schemes.make_spec(layers[0], layers[1], skip, "", ["linear", "embedding"], None, per_module)


def stored_bits(weight: Any) -> float:
    """Bits per weight a torchao quantized tensor takes on disk: packed codes, scales and zero points."""
    from distill.cost import tensor_bytes
    from distill.export.quantized import PACKED_BITS

    codes = weight.qdata.numel()  # one int8 per code in memory; packed to its width on disk
    return PACKED_BITS.get(weight.target_dtype, 8) + 8 * (tensor_bytes(weight) - codes) / codes


def run(cfg: DictConfig) -> dict[str, Any]:
    """Quantize the teacher each way, score every copy in one pass over the validation batches, write the table."""
    import torch

    from bench.studies.baselines import prepare
    from distill.compress.quant import schemes
    from distill.eval.heldout import heldout_metrics

    torch.set_num_threads(cfg.threads)
    bench = prepare(cfg)  # seed, teacher and data as train.py sets them up
    teacher, dm = bench.teacher, bench.datamodule
    models, bits = {}, {}
    for label, (layers, table) in VARIANTS.items():
        model = schemes.ptq(copy.deepcopy(teacher.model).eval(), variant_spec(layers, table))
        models[label] = model
        head = model.get_output_embeddings().weight
        bits[label] = stored_bits(head) if schemes.is_quantized(head) else 32.0
    batches = dm.heldout_dataloader("val", cfg.batches)  # tuning data: the choice of grids is made on it
    eos = teacher.tokenizer.eos_token_id
    scores = heldout_metrics(models, teacher, batches, teacher.vocab_size, eos_token_id=eos)
    rows = {label: {"table_bits_per_weight": bits[label], **scores[label]} for label in VARIANTS}
    result = {"batches": cfg.batches, "rows": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table_bits.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table_bits.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """``table_bits.md``: one row per variant."""
    first = next(iter(result["rows"].values()))
    lines = [
        "# Where int3's error comes from: the tied table or the layers",
        "",
        f"`python -m bench.table_bits`: torchao weight-only PTQ of the embedded teacher, no training; top-1 agreement "
        f"and KL with the teacher on {result['batches']} validation batches ({int(first['documents'])} documents, "
        f"{int(first['tokens']):,} tokens), 95 % intervals over documents. The table is the tied embedding/output "
        "head; a part not named stays in fp32.",
        "",
        "| rounded | table bits per weight | validation top-1 [95 %] | validation KL |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, r in result["rows"].items():
        top1 = f"{r['top1_agreement']:.3f} [{r['top1_agreement_ci_low']:.3f}, {r['top1_agreement_ci_high']:.3f}]"
        bits = r["table_bits_per_weight"]
        shown = "32 (fp32)" if bits == 32 else f"{bits:.2f}"
        lines.append(f"| `{label}` | {shown} | {top1} | {r['kl_to_teacher']:.3f} |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/table_bits")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
