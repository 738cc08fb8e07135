"""CSV cells that a spreadsheet shows as text, never runs as a formula.

Class names, file names and titles fetched from the web end up in CSV files that people open in
Excel or LibreOffice, which evaluate a cell starting with =, +, -, @ (or a tab or carriage return
before one) as a formula: `=HYPERLINK(...)` in a video title is enough. Such a cell gets a leading
apostrophe (OWASP's advice), which spreadsheets hide and every CSV reader keeps visible.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def cell(text: str) -> str:
    """`text`, or `'text` when a spreadsheet would take it for a formula."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text
