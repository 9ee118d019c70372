"""The figures in a benchmark's Markdown table, as rows of one summary table.

Two table shapes occur: bench/common.report's (one row per figure, with baseline, fast path and
speed-up columns) and bench/paper_protocol's (one row per path, one column per figure). Any other
table is kept as it is, one row per table row, so that a new table never loses its figures.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

COLUMNS = ("part", "figure", "value", "baseline", "ratio", "device")


@dataclass(frozen=True)
class Figure:
    part: str
    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    device: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of each table in `text`."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            block.append(_cells(line))
            continue
        if len(block) >= 2 and all(set(c) <= set("-: ") for c in block[1]):
            tables.append((block[0], block[2:]))
        block = []
    return tables


def number(cell: str) -> float | None:
    match = re.match(r"\s*([-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)", cell)
    return float(match.group(1)) if match else None


def device_of(text: str) -> str:
    match = re.search(r"^device: ([^;\n]+)", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


def _column_ratio(column: str, base: str, fast: str) -> str:
    b, f = number(base), number(fast)
    if b is None or f is None or b == 0 or f == 0:
        return ""
    if "accuracy" in column:
        return f"{f - b:+.4f} (difference)"
    return f"{f / b:.2f}x" if "/s" in column or "/s" in fast else f"{b / f:.2f}x"  # rates up, times down


def _paths_as_rows(
    part: str, header: list[str], rows: list[list[str]], device: str, settings: str
) -> list[Figure] | None:
    """paper_protocol's shape: a baseline row and a fast-path row, a figure per column; the total
    carries the settings (from the title), which a short budget scales down from the paper's."""
    base = next((r for r in rows if r and r[0].startswith("baseline")), None)
    fast = next((r for r in rows if r and r[0].startswith("fast path")), None)
    if base is None or fast is None:
        return None
    return [
        Figure(
            part,
            f"{column} ({settings})" if column == "total" and settings else column,
            f,
            b,
            _column_ratio(column, b, f),
            device,
        )
        for column, b, f in zip(header[1:], base[1:], fast[1:])
    ]


def part_figures(part: str, text: str, device: str = "") -> list[Figure]:
    """The figures of one part's returned text; `device` where the text names none."""
    device = device_of(text) or device
    title = re.search(r"^## .*?\((.*)\)\s*$", text, re.MULTILINE)
    figures: list[Figure] = []
    for header, rows in markdown_tables(text):
        names = [h.lower() for h in header]
        if "baseline" in names and "fast path" in names:
            b, f = names.index("baseline"), names.index("fast path")
            r = names.index("speed-up") if "speed-up" in names else None
            figures += [
                Figure(part, row[0], row[f], row[b], row[r] if r is not None else "", device)
                for row in rows
                if len(row) == len(header)
            ]
            continue
        by_path = _paths_as_rows(part, header, rows, device, title.group(1) if title else "")
        figures += (
            by_path
            if by_path is not None
            else [
                Figure(part, row[0], "; ".join(f"{h}: {v}" for h, v in zip(header[1:], row[1:])), device=device)
                for row in rows
            ]
        )
    if figures:
        return figures
    skip = re.search(r"^skipped: (.+)$", text, re.MULTILINE)  # a part that says why it timed nothing
    if skip:
        return [Figure(part, "all of its figures", f"skipped: {skip.group(1).strip()}", device=device)]
    return [Figure(part, "output", " ".join(text.split())[:200] or "(nothing)", device=device)]


def _plain(cell: str) -> str:
    return " ".join(cell.replace("|", "/").split())


def render(figures: list[Figure]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_plain(v) for v in f.as_dict().values()) + " |" for f in figures]
    return "\n".join(lines)
