"""The KV cache budget of a server: sessions reserve tokens when they open and give them back when they end."""

from __future__ import annotations

from petald.errors import PetalError


class CacheFullError(PetalError):
    """A session asked for more cache than the server has left."""


class CacheBudget:
    """Counts cache tokens (batch x max_length per session, for every block of the span) against a limit."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._reserved: dict[str, int] = {}

    @property
    def tokens_left(self) -> int:
        return self.max_tokens - sum(self._reserved.values())

    @property
    def sessions(self) -> int:
        return len(self._reserved)

    def reserve(self, session_id: str, tokens: int) -> None:
        """Reserve `tokens` for `session_id`, or raise CacheFullError saying what is left."""
        if session_id in self._reserved:
            raise CacheFullError(f"session {session_id} already holds a cache here")
        if tokens > self.tokens_left:
            raise CacheFullError(
                f"this server has cache room for {self.tokens_left} more tokens (budget {self.max_tokens}), "
                f"the session asks for {tokens}: try a smaller max_length or batch, or another server"
            )
        self._reserved[session_id] = tokens

    def release(self, session_id: str) -> None:
        self._reserved.pop(session_id, None)
