"""The one exception type users see.

Every problem the user can fix (bad record, wrong config key, missing file, impossible
setting) is raised as a ``TunesmithError`` whose message is one sentence naming the
culprit and the fix. The CLI prints that sentence and exits 1 — no traceback.
"""


class TunesmithError(Exception):
    """A user-facing error: ``str(err)`` is the whole message."""


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs become one space), at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def describe(exc: BaseException, limit: int = 2000) -> str:
    """An exception as one line: a TunesmithError's own sentence, else ``Type: message`` (a
    library's error quoted inside a sentence of ours)."""
    if isinstance(exc, TunesmithError):
        return one_line(str(exc), limit)
    return one_line(f"{type(exc).__name__}: {exc}", limit)


class DataError(TunesmithError):
    """A problem in an input data file, located as ``file:line:field: reason``.

    ``line`` is the physical line (1-based) for JSONL/CSV and the record index
    (0-based) for JSON and Parquet; ``field`` is a dotted path such as
    ``messages.2.role`` or ``""`` when the problem is the whole record or file.
    """

    def __init__(self, file: str, line: int | None, field: str, reason: str):
        self.file, self.line, self.field, self.reason = str(file), line, field, reason
        super().__init__(self.location() + reason)

    def __reduce__(self):
        # Exception pickles as cls(*args), which this constructor cannot take: rebuild from
        # the message and the fields instead (worker processes send these back: data curate).
        return _restore, (type(self), self.args, dict(self.__dict__))

    def location(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(str(self.line))
        if self.field:
            parts.append(self.field)
        return ":".join(parts) + ": "


def _restore(cls: type, args: tuple, state: dict) -> DataError:
    err = Exception.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err
