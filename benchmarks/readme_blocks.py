"""The README's generated blocks: text between a start and an end marker that a script rewrites
(report.py: the measured tables; kernel_report.py: the static table; perf_model.py: the
predictions). Everything outside the markers is left as it is."""
from __future__ import annotations

from pathlib import Path


def fill_block(readme: Path, start: str, end: str, text: str) -> None:
    """Replace what lies between ``start`` and ``end`` in ``readme`` with ``text``; a ValueError
    when the markers are missing or out of order."""
    body = readme.read_text(encoding="utf-8")
    if start not in body or end not in body or body.index(start) > body.index(end):
        raise ValueError(f"{readme} has no '{start}' ... '{end}' block to fill")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")
