"""Typed errors. A `UserError` is the user's to fix: the CLI prints its message and exits
non-zero without a traceback. Anything else is our bug and keeps its traceback."""


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
