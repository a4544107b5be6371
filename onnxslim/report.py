"""Markdown and JSON report writing shared by ``onnxslim check`` and ``onnxslim run``.

* :func:`markdown_table` renders GitHub-flavoured Markdown tables (pipes in cells are escaped).
* :func:`write_report` writes ``<stem>.md`` and ``<stem>.json`` into a folder, each atomically.
* :func:`append_step_summary` appends Markdown to the file named by ``$GITHUB_STEP_SUMMARY`` (GitHub
  Actions shows it on the run's summary page). That file belongs to the runner and collects every
  step's summary, so it is appended to, never replaced.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxslim.io import write_json_atomic, write_text_atomic

STEP_SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"


def markdown_escape(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``align`` entries are ``l``, ``r`` or ``c`` per column (left by default)."""
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    align = list(align) if align else ["l"] * len(header)
    if len(align) != len(header):
        raise ValueError("one alignment per column")
    lines = ["| " + " | ".join(markdown_escape(h) for h in header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, header {len(header)}")
        lines.append("| " + " | ".join(markdown_escape(c) for c in row) + " |")
    return "\n".join(lines)


def write_report(directory: str | os.PathLike, stem: str, markdown: str, payload: Any) -> tuple[Path, Path]:
    """Write ``<directory>/<stem>.md`` and ``<stem>.json`` atomically; returns both paths."""
    directory = Path(directory)
    markdown_path, json_path = directory / f"{stem}.md", directory / f"{stem}.json"
    write_text_atomic(markdown_path, markdown if markdown.endswith("\n") else markdown + "\n")
    write_json_atomic(json_path, payload)
    return markdown_path, json_path


def append_step_summary(markdown: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to ``$GITHUB_STEP_SUMMARY`` when set; returns the file, or None when unset."""
    environ = os.environ if environ is None else environ
    target = environ.get(STEP_SUMMARY_VARIABLE)
    if not target:
        return None
    path = Path(target)
    # appending is the contract of this runner-owned file; one write call keeps the block together
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(markdown.rstrip("\n") + "\n\n")
    return path


def format_bytes(count: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def format_count(count: int | float) -> str:
    """12_345_678 -> '12.35M'."""
    value = float(count)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}"
    return f"{value:.0f}"
