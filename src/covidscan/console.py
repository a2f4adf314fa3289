"""Where the command line's messages go out: text is printed as given, never parsed.

A file name is user text: through rich's defaults ``scan[/x].png`` is a markup error (a traceback),
``[bold]`` vanishes, ``:smile:`` becomes an emoji, and a name that is not UTF-8 (``bad\\xff.png``, decoded
by Python with surrogate escapes) cannot be encoded for the terminal. Every console and the log handler of
the command line go through this module, so no message has to escape its own parts.
"""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text


def printable(text: object) -> str:
    """``text`` as a terminal can show it: bytes of a non-UTF-8 file name become ``\\xNN``."""
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")  # a file name's undecodable bytes, as they were
    except UnicodeEncodeError:  # other lone surrogates, which no file name decodes to
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


class PlainConsole(Console):
    """A rich console without markup or emoji codes, whose plain strings are made printable.

    Styled words are passed as :class:`rich.text.Text` (see :func:`labelled`), never as markup.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, emoji=False, soft_wrap=True, **kwargs)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


def labelled(label: str, style: str, message: object) -> Text:
    """``label message`` with only the label styled: ``labelled("error:", "bold red", exc)``."""
    return Text.assemble((label, style), " ", printable(message))


class PlainRichHandler(RichHandler):
    """Log records through rich, their text printed as given (no markup, printable file names)."""

    def render_message(self, record: logging.LogRecord, message: str) -> Any:
        return super().render_message(record, printable(message))


stdout = PlainConsole()
stderr = PlainConsole(stderr=True)
