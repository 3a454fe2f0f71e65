"""A job's stream of text while it decodes, through Redis: what the worker writes and what the
API reads, for the sync and streaming interfaces.

Each job that streams has one Redis stream, `mbatch:stream:<job id>`. The worker appends a
`text` event with the text each step added (only for jobs that asked to stream), and an `end`
event once the job's ending is committed in Postgres (for every job of the interactive lane),
so the API knows to read it there. Every event names the attempt that wrote it: a job given
to another worker starts its text again, and the reader keeps to what agrees with what it has
already shown (`StreamedText`).

The stream is a convenience, never the record: it expires `stream_ttl_seconds` after its last
event, and a reader that loses it (Redis restarted, or down) reads the job from Postgres.
"""

from collections.abc import Mapping
from dataclasses import dataclass

# Redis keeps at most about this many events per stream: far more than a job's tokens.
MAX_EVENTS = 100_000

TEXT = "text"
END = "end"


def stream_key(job_id: str) -> str:
    return f"mbatch:stream:{job_id}"


def interactive_key(model: str) -> str:
    """A counter the API increments for each interactive job of `model` it queues: a worker
    whose batch is full of bulk work reads it every step (one small read) and looks in
    Postgres for the job only when it moved. A hint, not the record: a worker that cannot read
    it looks in Postgres every few steps instead."""
    return f"mbatch:interactive:{model}"


@dataclass(frozen=True)
class StreamEvent:
    """One event of a job's stream: `kind` TEXT (with the `text` a step added) or END."""

    kind: str
    attempt: int
    text: str = ""
    # Where `text` starts in the attempt's text: a writer that could not send some text
    # sends it again from where it was, and a reader never joins text across a gap.
    offset: int = 0

    def fields(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "attempt": str(self.attempt),
            "offset": str(self.offset),
            "text": self.text,
        }

    @classmethod
    def parse(cls, fields: Mapping[bytes | str, bytes | str]) -> "StreamEvent":
        values = {
            (key.decode() if isinstance(key, bytes) else key): (
                value.decode() if isinstance(value, bytes) else value
            )
            for key, value in fields.items()
        }
        return cls(
            values.get("kind", ""),
            int(values.get("attempt", "0")),
            values.get("text", ""),
            int(values.get("offset", "0")),
        )


class StreamedText:
    """What a reader has shown of a job's text, and what each attempt has written: text is
    shown only where it continues what was shown, so a repeated attempt (a job given to
    another worker) or the answer read from Postgres never shows anything twice."""

    def __init__(self) -> None:
        self.shown = ""
        self._written: dict[int, str] = {}

    def add(self, event: StreamEvent) -> str:
        """The new text to show for a TEXT event ("" where there is none)."""
        written = self._written.get(event.attempt, "")
        if event.offset > len(written):
            return ""  # text before it was lost: the attempt's next resend, or the answer
        written = written[: event.offset] + event.text
        self._written[event.attempt] = written
        return self.offer(written)

    def offer(self, text: str) -> str:
        """The part of `text` (a whole answer so far) that continues what was shown."""
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        new = text[len(self.shown) :]
        self.shown = text
        return new
