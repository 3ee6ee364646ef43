"""Server-sent events: the incremental parser of a ``text/event-stream`` body.

OpenAI-compatible servers stream a completion as one event per token, each a
``data: {json}`` line and an empty line. The client reads the body in whatever pieces
the network delivers and hands them to :class:`SSEDecoder`, which returns the ``data``
of every event those pieces complete. It sits on the measuring path (a few dozen events
per request, thousands of requests per second), so the usual event goes through a
short path: one split of the buffer, one check, one decode.
"""

from __future__ import annotations

__all__ = ["SSEDecoder"]


class SSEDecoder:
    """Incremental parser of a ``text/event-stream`` body into the ``data`` of each event.

    Follows the event-stream rules that matter for OpenAI-style streams: lines end in
    ``\\n``, ``\\r\\n`` or ``\\r``; an empty line ends an event; ``data:`` lines (one optional
    space after the colon) are joined with ``\\n``; comment lines (``:``) and other fields
    are skipped. Bytes may arrive split anywhere, even inside a line or a UTF-8 character.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        # Everything after the last complete event: the next event's first lines, whole or cut.
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        """Add received bytes; return the data of every event they complete.

        Raises:
            UnicodeDecodeError: An event's data is not UTF-8 (a ``ValueError``).
        """
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # maybe the first half of \r\n: decide when more arrives
                self._buf = buf
                return []
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        # An empty line ends an event, so each piece but the last is one whole event's lines.
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        events: list[str] = []
        for block in blocks:
            if block.startswith(b"data:") and b"\n" not in block:  # the usual event: one data line
                events.append((block[6:] if block[5:6] == b" " else block[5:]).decode())
                continue
            data = [
                line[6:] if line[5:6] == b" " else line[5:] for line in block.split(b"\n") if line.startswith(b"data:")
            ]
            if data:
                events.append(b"\n".join(data).decode())
        return events

    def close(self) -> list[str]:
        """The event left open when the stream ended without its empty line, if any."""
        events = self.feed(b"\n\n") if self._buf else []
        self._buf = b""
        return events
