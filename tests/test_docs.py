"""The reference pages read off the code, and the results included in the docs, are current (docs/generate.py)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_generated_reference_pages_are_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# Three-decimal figures written by hand in prose, each with why it is no measurement a report should give.
NOT_MEASURED = {
    ("docs/evaluation.md", "0.045"): "the half-width of a 95 % interval at p = 0.5 over 500 examples, by formula",
    ("docs/prune.md", "0.333"): "a config value in an example (heads=0.333)",
}


def _prose(text: str) -> str:
    """The hand-written part of a page: generated blocks, code blocks and code spans removed."""
    text = re.sub(r"<!-- include: .*? -->.*?<!-- /include -->", "", text, flags=re.S)
    text = re.sub(r"<!-- (headline|default-run):start -->.*?<!-- \1:end -->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_no_page_quotes_a_measured_rate_by_hand():
    """Top-1, KL and the like (three decimals, as the reports print them) appear only in generated blocks.

    A rate typed into a page goes stale when the run is measured again, and two pages then disagree; the
    generated blocks (docs/generate.py, bench/headline.py) read them from the committed reports instead.
    """
    pages = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    typed = []
    for page in pages:
        rel = page.relative_to(ROOT).as_posix()
        if rel in ("docs/config_groups.md", "docs/modules.md"):  # generated from conf/ and the code
            continue
        for number in re.findall(r"(?<![\w.])\d+\.\d{3,}(?![\w.])", _prose(page.read_text())):
            if (rel, number) not in NOT_MEASURED:
                typed.append(f"{rel}: {number}")
    assert typed == []


def test_the_check_finds_a_typed_rate_and_skips_generated_ones():
    page = "top-1 0.812 here\n<!-- include: bench/results/x.md -->\n0.813\n<!-- /include -->\n`0.814` 2.5 GB"
    assert re.findall(r"(?<![\w.])\d+\.\d{3,}(?![\w.])", _prose(page)) == ["0.812"]
