"""CSV for people to open in a spreadsheet: every CSV the app hands out is written here (the Runs
page's test predictions, the Predict page's results and its log, `python -m core predict` and
`python -m core predictions --csv`).

A spreadsheet runs a cell that starts with "=", "+", "-" or "@" as a formula (a leading tab or
carriage return makes some of them do so too), and the names in these files come from outside: an
image uploaded as `=HYPERLINK("http://...","Sign in again")` would become a link, or worse, in the
reader's spreadsheet. Such a text cell is written with a leading apostrophe, which spreadsheets show
as text and never evaluate (OWASP's advice on CSV injection); headers too, as they may be class names.
Numbers stay numbers, negative ones included, and so does text that is only a number ("-0.5"):
neither is a formula.

Only stdlib: the pages, the API and the command line use it alike.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def cell(value: Any) -> Any:
    """`value` as a spreadsheet should read it: text that would start a formula gets a leading "'"."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_csv(out: TextIO, header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> None:
    """`header`, then `rows`, to `out` as CSV, every cell through `cell`; None is an empty cell. Lines
    end in CRLF, as RFC 4180 has it: Python's writer then quotes a cell holding either character
    (with "\\n" line ends it would leave a lone "\\r" unquoted, and readers would split the row there)."""
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([cell(v) for v in header])
    writer.writerows([cell(v) for v in row] for row in rows)


def csv_text(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """The CSV of `write_csv`, as a string."""
    out = io.StringIO()
    write_csv(out, header, rows)
    return out.getvalue()
