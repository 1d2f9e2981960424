"""Typed errors. A `UserError` is the user's to fix: the CLI prints its message and exits
non-zero without a traceback. Anything else is our bug and keeps its traceback."""

import re


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class ModelSourceError(UserError):
    """The model to export is missing, is not a Stable Diffusion model, or is not trusted."""


class EngineError(UserError):
    """An engine directory is missing, incomplete, corrupted or of an unknown format."""


class BackendUnavailable(UserError):
    """The chosen backend cannot run on this machine."""


class InvalidRequest(UserError):
    """Generation parameters outside what the engine or sampler supports."""


def renamed(message: str, names: dict[str, str]) -> str:
    """A message that starts with a Pipeline keyword ("strength must lie in (0, 1]") with that
    keyword as the caller gave it (`names`: keyword -> a flag, an API's field); others as they are."""
    head = re.match(r"\w+(?=[ :]|$)", message)
    if head is None or head.group() not in names:
        return message
    return names[head.group()] + message[head.end():]
