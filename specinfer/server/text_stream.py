"""Turn a growing list of output tokens into text deltas, and cut the text at the first stop string.

Decoding token by token breaks multi-byte characters and SentencePiece's leading spaces, so each delta
is the difference between two decodings that start at the same token (`prefix` below), and text that
ends in an incomplete character is held back. Text that could still become a stop string is held back
too, so a client never sees the start of a stop string that then completes.
"""

from __future__ import annotations

from ..tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what decoding gives for a partial UTF-8 sequence


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.text = ""  # all text decoded so far, stop string excluded once found
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False
        self._prefix = 0  # decoding starts at this token ...
        self._read = 0  # ... and `text` covers the tokens before this one

    def push(self, tokens: list[int], final: bool = False) -> str:
        """Take the whole output so far; return the text that may be sent now. `final`: no more tokens
        will come, so flush whatever was held back."""
        if self.stopped:
            return ""
        if len(tokens) > self._read:
            before = self.tokenizer.decode(tokens[self._prefix : self._read])
            after = self.tokenizer.decode(tokens[self._prefix :])
            if not after.endswith(_INCOMPLETE) or final:
                self.text += after[len(before) :]
                self._prefix, self._read = self._read, len(tokens)
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
