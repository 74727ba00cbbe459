"""The reference pages read off the code, and the results included in the docs, are current (docs/generate.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_generated_reference_pages_are_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
