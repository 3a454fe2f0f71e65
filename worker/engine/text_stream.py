"""The text of a decoding row that may be shown while it decodes.

A row's text so far is not all showable: its last tokens may be part of a character that
spans several byte-fallback tokens (an emoji, a CJK character: the decoder shows U+FFFD for
the bytes it has), and its end may be the start of a stop string, which is never shown, not
even in part. What is shown only ever grows: each update is a prefix of every later one and of
the row's final text, so the pieces joined are the answer.
"""

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
REPLACEMENT = "\ufffd"


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


def showable(text: str, stops: Sequence[str]) -> str:
    """The part of a row's text so far that is safe to show: up to any stop string it holds,
    without a trailing broken character or what could begin a stop string."""
    for stop in stops:
        found = text.find(stop)
        if found >= 0:
            text = text[:found]
    text = text.rstrip(REPLACEMENT)
    return text[: len(text) - held_back(text, stops)]


class TextStream:
    """One row's showable text, as its tokens come."""

    def __init__(self, decode: Decode, stops: Sequence[str]) -> None:
        self.decode = decode
        self.stops = list(stops)
        self.shown = ""

    def update(self, tokens: Sequence[int]) -> str:
        """The row's showable text after `tokens` (all of them so far). It never shrinks: where
        a decode disagrees with what was shown (a decoder that rewrites earlier text), the
        text shown so far stands until the row's final text settles it."""
        text = showable(self.decode(tokens), self.stops)
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.shown = text
        return self.shown
