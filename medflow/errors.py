"""Errors raised by the spec and the command line."""


class MedflowError(Exception):
    """Base class of medflow's own errors."""


class SpecError(MedflowError, ValueError):
    """A pipeline spec is invalid. ``problems`` lists one line per problem."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class LabelError(MedflowError, ValueError):
    """The labels CSV does not fit the spec or the store (a missing column, an unknown class, too few)."""
