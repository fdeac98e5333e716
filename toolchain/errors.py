"""User-facing errors.

A `UserError` is something the user can fix (a bad path, a bad config value, a model we do not
support). The CLI prints its message on one line and exits non-zero, without a traceback unless
`--debug` is given. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by input the user can fix; the message says what and how."""


class VerificationError(UserError):
    """An export did not behave like the torch model within the configured thresholds.

    `figures` keeps the measured values so the report can show what failed.
    """

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


class DivergenceError(UserError):
    """Training made the student clearly worse on held-out data (or produced a non-finite loss).

    `figures` holds the best and last evaluations; the student the loop hands back carries the
    best weights, so the caller can keep them.
    """

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}
