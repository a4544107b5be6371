"""No function in onnxslim/ is longer than 80 lines (measured by tools/check_function_length.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_function_length", ROOT / "tools" / "check_function_length.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_package_has_no_function_longer_than_80_lines():
    assert check.long_functions([ROOT / "onnxslim"], limit=80) == []


def test_the_check_measures_from_def_to_last_line_including_nested_functions(tmp_path):
    source = tmp_path / "sample.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    source.write_text(f"class A:\n    def short(self):\n        return 1\n\n\ndef outer():\n{body}\n\n"
                      f"    def inner():\n        return 2\n    return inner\n")
    found = check.long_functions([source], limit=3)
    assert [(name, length) for _, _, name, length in found] == [("outer", 10)]
    assert check.main([str(source), "--limit", "3"]) == 1
    assert check.main([str(tmp_path / "missing.py")]) == 2
