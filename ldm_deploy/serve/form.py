"""multipart/form-data bodies (OpenAI's image edit API sends its image and mask so), read with
the standard library's MIME parser: -> {field: text, or bytes for a file}."""

from __future__ import annotations

import email.parser
import email.policy

from ldm_deploy.errors import InvalidRequest


def parse_form(raw: bytes, content_type: str | None) -> dict:
    """The body's fields: text for plain fields, bytes for files (their file name aside). A
    field sent twice keeps its first value; "image[]" (the form of a list) reads as "image"."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequest(f"send the body as multipart/form-data, as OpenAI's image edit API takes it "
                             f"(got Content-Type {content_type or 'none'})")
    if "boundary=" not in content_type.lower():
        raise InvalidRequest("the multipart/form-data Content-Type names no boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    if not message.is_multipart():
        raise InvalidRequest("the multipart/form-data body could not be read (no parts between its boundaries)")
    out = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        name = name.removesuffix("[]")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is None:
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"form field {name!r} is not UTF-8 text") from None
        out.setdefault(name, data)
    return out


def numbers(form: dict, kinds: dict) -> dict:
    """The form with its number fields ({name: int or float}) read from their text."""
    out = dict(form)
    for name, kind in kinds.items():
        value = out.get(name)
        if isinstance(value, str):
            try:
                out[name] = kind(value.strip())
            except ValueError:
                raise InvalidRequest(f"{name} must be a {'whole number' if kind is int else 'number'}, "
                                     f"got {value[:40]!r}") from None
    return out
