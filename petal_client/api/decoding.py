"""Text from tokens as they are generated: incremental decoding and stop sequences. No I/O here."""

from __future__ import annotations


class TokenText:
    """The text of the tokens generated so far, given out in pieces that are final.

    A piece never ends inside a multi-byte character (the decoder shows an unfinished one as U+FFFD, as
    transformers' TextStreamer knows), nor with text that may be the start of a stop sequence. Once a stop
    sequence appears, the text ends just before it (`stopped` is then True)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.given = 0  # characters of the text given out so far
        self.stopped = False

    def add(self, token_id: int) -> str:
        """The new final text after `token_id` (often ''); nothing more once stopped."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [i for i in (text.find(s, max(0, self.given - len(s))) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._give(text, min(found))
        end = len(text.rstrip("\ufffd"))
        return self._give(text, end - self._stop_prefix(text[:end]))

    def flush(self) -> str:
        """The rest of the text, at the end of generation (a held-back stop prefix was not a stop after all)."""
        if self.stopped:
            return ""
        return self._give(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _give(self, text: str, end: int | None) -> str:
        piece = text[self.given : end]
        self.given += len(piece)
        return piece

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest end of `text` that starts some stop sequence."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
