"""Strings that came from the database, made safe for a terminal.

Worker names, devices, event messages and rejection reasons are typed by whoever holds a
login. On the instructor's terminal such a string must never be a control sequence (an
escape that moves the cursor, retitles the window or writes the clipboard with OSC 52), a
bidirectional override that reorders what is shown, or a line break that forges a log
line. Dashboards also never hand these strings to Rich as markup (``[/x]`` would end the
view with a MarkupError): they are wrapped in ``rich.text.Text``, which is not parsed.
"""

from __future__ import annotations

import unicodedata

# Control (C0, C1, DEL), format (bidi overrides, zero-width joiners), surrogates, private
# use, unassigned, and line/paragraph separators.
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
DEFAULT_LIMIT = 200


def printable(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """``value`` as text with every unsafe character replaced by ``?``, cut at ``limit``
    characters (an ellipsis marks the cut)."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    text = text[:limit]
    if not text.isprintable() or any(unicodedata.category(c) in _UNSAFE for c in text):
        text = "".join("?" if unicodedata.category(c) in _UNSAFE else c for c in text)
    return text + "…" if cut else text
