"""Recipe variants against the run they change one setting of: paired differences over the same test documents.

Each comparison names a reference run and a variant run (folders with ``report.json``) that differ in one setting at
equal steps; the table gives both runs' top-1 agreement and KL with the teacher on the test split and the English set,
and the variant minus the reference with a 95 % paired interval over documents
(:func:`distill.eval.heldout.paired_difference`). The runs' own reports hold everything else.

    python -m bench.paired_runs

Writes ``bench/results/paired_runs.{json,md}``; docs/qat.md includes the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from distill.config import config_error, exit_on_config_error
from distill.eval.heldout import paired_difference

SETS = {"test": "heldout", "english": "heldout_english"}  # the report's row sets and their metric prefixes
METRICS = {"top1": ("agree", "top1_agreement"), "kl": ("kl", "kl_to_teacher")}


def _report(field: str, folder: str) -> dict[str, Any]:
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise config_error(field, folder, "no report.json there; give a run folder that finished its evaluation")
    return json.loads(path.read_text())


def compare(reference: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """Both runs' rates and the paired differences (variant − reference) per held-out set and metric."""
    out: dict[str, Any] = {"steps": [reference["run"]["steps"], variant["run"]["steps"]]}
    for held, prefix in SETS.items():
        rows_r = reference["heldout_rows"][held]["student"]
        rows_v = variant["heldout_rows"][held]["student"]
        for metric, (key, name) in METRICS.items():
            diff, low, high, docs = paired_difference(rows_v, rows_r, key)
            out[f"{held}/{metric}"] = {
                "reference": reference["metrics"]["student"][f"{prefix}/{name}"],
                "variant": variant["metrics"]["student"][f"{prefix}/{name}"],
                "difference": [diff, low, high],
                "documents": docs,
            }
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Compare every configured pair; write and print the table."""
    result = {}
    reports = {
        name: (_report(f"comparisons.{name}.reference", p.reference), _report(f"comparisons.{name}.variant", p.variant))
        for name, p in cfg.comparisons.items()
    }  # every folder checked before anything is written
    for name, (reference, variant) in reports.items():  # "one setting apart" holds only at equal steps
        if reference["run"]["steps"] != variant["run"]["steps"]:
            steps = f"{reference['run']['steps']} and {variant['run']['steps']} steps"
            raise config_error(f"comparisons.{name}", name, f"its runs trained {steps}; compare runs of equal steps")
    for name, pair in cfg.comparisons.items():
        entry = compare(*reports[name])
        result[name] = {"what": pair.what, "reference": Path(pair.reference).name, "variant": Path(pair.variant).name}
        result[name].update(entry)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paired_runs.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "paired_runs.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """One row per comparison and held-out set: reference, variant, and the paired difference."""
    lines = [
        "`python -m bench.paired_runs`: each variant against the run it changes one setting of, at equal steps; "
        "variant − reference with a 95 % paired interval over the same documents (KL: lower is better).",
        "",
        "| variant (against) | steps | set | top-1: reference → variant | Δ top-1 | KL: reference → variant | Δ KL |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result.values():
        for held in SETS:
            t, k = r[f"{held}/top1"], r[f"{held}/kl"]
            dt, dk = t["difference"], k["difference"]
            lines.append(
                f"| {r['what']} (`{r['reference']}`) | {r['steps'][1]} | {held} ({t['documents']} docs) "
                f"| {t['reference']:.3f} → {t['variant']:.3f} | {dt[0]:+.3f} [{dt[1]:+.3f}, {dt[2]:+.3f}] "
                f"| {k['reference']:.3f} → {k['variant']:.3f} | {dk[0]:+.3f} [{dk[1]:+.3f}, {dk[2]:+.3f}] |"
            )
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench/paired_runs")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    with exit_on_config_error():
        run(cfg)


if __name__ == "__main__":
    main()
