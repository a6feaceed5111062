"""The one exception type users see: a message they can act on, turned into one line by the CLI."""

from __future__ import annotations


class MpinnError(Exception):
    """A user-facing error: bad input, a bad file, a partition that does not fit the job.

    ``agreed`` is set once every rank is known to raise the same error (see
    ``exchange.agree``); only then may rank 0 report it alone and all ranks exit cleanly.
    """

    def __init__(self, message: str, agreed: bool = False) -> None:
        super().__init__(message)
        self.agreed = agreed
