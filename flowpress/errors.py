"""The one error type for bad user input, shared by every layer (sampling is the bottom one)."""


class FlowpressError(Exception):
    """Bad input or an unmet requirement; the message is one line: what, where, how to fix."""


class EngineParityError(FlowpressError):
    """An engine that does not compute what its graph says on this host: exit code 3, apart from
    bad input (2) and a failed gate (1).  The message names the measured cause and what passes."""

    exit_code = 3

    def __init__(self, message: str, results: tuple[object, ...] = ()):
        super().__init__(message)
        self.results = results  # what was measured before the failing check (export.validate.Parity)
