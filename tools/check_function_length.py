"""List functions longer than a limit (default 80 lines), measured with ``ast``.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` node: from the ``def`` line (decorators
excluded) to its last line, docstring, comments and blank lines inside included. Nested functions count
inside their parent and on their own.

    python tools/check_function_length.py onnxslim/graph            # exit 1 when any is too long
    python tools/check_function_length.py onnxslim --limit 80
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def long_functions(paths: list[Path], limit: int = 80) -> list[tuple[str, int, str, int]]:
    """(file, line, qualified name, length) of every function longer than ``limit`` lines under ``paths``."""
    found = []
    for path in paths:
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            tree = ast.parse(file.read_text(), filename=str(file))
            for qualname, node in _functions(tree, ""):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append((str(file), node.lineno, qualname, length))
    return found


def _functions(tree: ast.AST, prefix: str):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=80)
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"error: no such file or directory: {missing[0]}", file=sys.stderr)
        return 2
    found = long_functions(args.paths, args.limit)
    for file, line, name, length in found:
        print(f"{file}:{line}: {name} is {length} lines (limit {args.limit})")
    print(f"{len(found)} function(s) longer than {args.limit} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
