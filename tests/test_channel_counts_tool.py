"""tools/channel_counts.py: the comparison of two records of slim's channel counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("channel_counts", ROOT / "tools" / "channel_counts.py")
channel_counts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(channel_counts)


def test_compare_reports_changed_counts_and_missing_calls_of_the_selected_files():
    reference = {
        "tests/a.py::test_one#0": [["c1", "Conv", 8, 5], ["c2", "Conv", 4, 4]],
        "tests/a.py::test_two#0": [["g", "Gemm", 6, 6]],
        "tests/b.py::test_three#0": [["c", "Conv", 3, 3]],
    }
    current = {"tests/a.py::test_one#0": [["c1", "Conv", 8, 6], ["c2", "Conv", 4, 4]]}
    problems = channel_counts.compare(reference, current, ["tests/a.py"])
    assert problems == ["tests/a.py::test_one#0: ['c1', 'Conv', 8, 5] -> ['c1', 'Conv', 8, 6]",
                        "tests/a.py::test_two#0: not run now"]
    assert channel_counts.compare(reference, reference) == []
