"""Text from data made safe to print on a terminal.

Class names, file names, manifest warnings and the error messages that quote them come from files a
stranger may have written. Printed raw, an escape sequence in them (ESC [ ... ) can recolour or clear
the terminal, move the cursor, set its title or, on some terminals, answer back as if typed; a
carriage return or backspace can overwrite what was printed before it, and a bidirectional override
can show text in another order than it is stored. `printable` writes every such character as a
visible escape (`\\x1b`, `\\r`, `\\u202e`), so the user sees what the name really holds.
(`csvsafe` does the same job for spreadsheets.)
"""

from __future__ import annotations

import re

# DEL, C1 controls, line/paragraph separators, bidirectional embeddings, overrides and isolates; then the C0
# controls, with or without the line feed (\x0a).
_OTHERS = "\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_ANY = re.compile(f"[\x00-\x1f{_OTHERS}]")
_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f{_OTHERS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def printable(text: object, lines: bool = False) -> str:
    """`str(text)` with every control character written as a visible escape.

    Args:
        text: a name, message or whole report.
        lines: keep line breaks (a multi-line report or message made by audioshard); without it a
            newline in a name is escaped too, so a name cannot pose as a line of its own.
    """
    return (_BUT_NEWLINE if lines else _ANY).sub(_escape, str(text))
