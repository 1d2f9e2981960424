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
    """A message that names Pipeline keywords ("strength must lie in (0, 1]", "control_start and
    control_end are ...") with those keywords as the caller gave them (`names`: keyword -> a flag,
    an API's field): the first word where it is one, and keywords with an underscore where they
    stand as words of a list or a sentence (not within a path, a file name or a word); a
    parenthesis that then repeats the names it follows is left out."""
    head = re.match(r"\w+(?=[ :,]|$)", message)
    if head is not None and head.group() in names:
        message = names[head.group()] + message[head.end():]
    keys = sorted((k for k in names if "_" in k), key=len, reverse=True)
    if keys:
        pattern = (r"(?:(?<=^)|(?<=[ (]))(" + "|".join(map(re.escape, keys)) +
                   r")(?=,| and | or | \(|\)| must | is | are |:|$)")
        message = re.sub(pattern, lambda m: names[m.group(1)], message)

    def repeated(m) -> str:  # " (--a, --b)" after a text that names --a and --b already
        flags = [f.strip() for f in m.group(1).split(",")]
        return "" if all(f in message[:m.start()] for f in flags) else m.group(0)

    return re.sub(r" \((--[\w-]+(?:, --[\w-]+)*)\)", repeated, message)
