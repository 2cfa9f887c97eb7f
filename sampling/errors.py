"""The one error type for bad user input, shared by every layer (sampling is the bottom one)."""


class FlowpressError(Exception):
    """Bad input or an unmet requirement; the message is one line: what, where, how to fix."""
