"""multipart/form-data bodies (OpenAI's image edit API sends its image and mask so) -> {field:
text, or bytes for a file}.

Read by a small parser of our own, in one pass of `bytes.find` over the body: the standard
library's email parser reads folded or many-parameter part headers in quadratic time (a 200 KB
body held a core for a minute) and raises IndexError, RecursionError, ... on malformed ones. Here a
form has at most MAX_PARTS parts with headers of at most MAX_HEAD bytes; anything else is a 400.
"""

from __future__ import annotations

import re

from ldm_deploy.errors import InvalidRequest

MAX_PARTS = 64
MAX_HEAD = 8192  # bytes of one part's headers
BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
PARAM = re.compile(r'(?:^|;)\s*(name|filename)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))', re.IGNORECASE)
PLAIN_ENCODINGS = ("", "7bit", "8bit", "binary")


def parse_form(raw: bytes, content_type: str | None, files: tuple[str, ...] = ()) -> dict:
    """The body's fields: text, or bytes for parts sent as files (a filename) and for the fields
    named in `files` whatever they say. "image[]" (a list's form) reads as "image"; a field sent
    twice is refused (one image is edited here)."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequest(f"send the body as multipart/form-data, as OpenAI's image edit API takes it "
                             f"(got Content-Type {str(content_type or 'none')[:80]})")
    match = BOUNDARY.search(content_type)
    if not match:
        raise InvalidRequest("the multipart/form-data Content-Type names no boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1", "replace")
    out = {}
    for head, data in parts(raw, delimiter):
        name, filename = disposition(head)
        if name is None:
            continue
        name = name.removesuffix("[]")
        if name in out:
            raise InvalidRequest(f"form field {name[:40]!r} is sent twice; this server takes one of each "
                                 "(one image is edited at a time)")
        if filename is None and name not in files:
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"form field {name[:40]!r} is not UTF-8 text") from None
        out[name] = data
    return out


def parts(raw: bytes, delimiter: bytes):
    """Yield (headers as text, content) of each part between the delimiters (a body cut off
    before its closing delimiter: what came of its last part)."""
    pos = raw.find(delimiter)
    if pos < 0:
        raise InvalidRequest("the multipart/form-data body could not be read (its boundary never appears)")
    pos += len(delimiter)
    count = 0
    while not raw.startswith(b"--", pos):  # "--" after a delimiter closes the body
        line = raw.find(b"\r\n", pos)
        if line < 0:
            return
        start = line + 2
        end = raw.find(b"\r\n" + delimiter, start)
        part = raw[start:] if end < 0 else raw[start:end]
        count += 1
        if count > MAX_PARTS:
            raise InvalidRequest(f"the form has more than {MAX_PARTS} parts")
        split = part.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if part.startswith(b"\r\n"):  # no headers at all
            split = -2
        elif split < 0:
            raise InvalidRequest(f"a form part's headers are missing their end, or longer than {MAX_HEAD} bytes")
        yield part[:max(split, 0)].decode("latin-1"), part[split + 4:]
        if end < 0:
            return
        pos = end + 2 + len(delimiter)


def disposition(head: str) -> tuple[str | None, str | None]:
    """A part's headers -> (field name, file name), from its Content-Disposition; its content must
    be sent as it is (no nested multipart, no transfer encoding)."""
    headers = {}
    for line in re.sub(r"\r\n[ \t]+", " ", head).split("\r\n"):  # unfolded
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("content-type", "").lower().startswith("multipart/"):
        raise InvalidRequest("a form part holding another multipart body is not taken")
    if headers.get("content-transfer-encoding", "").lower() not in PLAIN_ENCODINGS:
        raise InvalidRequest("form parts are taken as they are sent (binary); a Content-Transfer-Encoding is not")
    found = {}
    for m in PARAM.finditer(headers.get("content-disposition", "")):
        found.setdefault(m.group(1).lower(), m.group(2) if m.group(2) is not None else m.group(3))
    return found.get("name"), found.get("filename")


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
