"""The README's results section is generated from bench/results/ and must be in sync with it."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import readme_results  # noqa: E402


def test_readme_results_section_is_generated_from_the_result_files():
    assert readme_results.main(["--check"]) == 0, (
        "run `python bench/readme_results.py` after changing bench/results/")
