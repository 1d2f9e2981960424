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
MAX_TEXT = 256 << 10  # bytes of one text field (a prompt is a few hundred)
BOUNDARY = re.compile(r'(?:^|;)\s*boundary\s*=\s*(?:"([^"]*)"|([^\s;"]*))', re.IGNORECASE)
PARAM = re.compile(r'(?:^|;)\s*(name|filename)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))', re.IGNORECASE)
DELIMITERS: dict = {}  # delimiter -> its compiled pattern (delimiter_at)
PLAIN_ENCODINGS = ("", "7bit", "8bit", "binary")


def parse_form(raw: bytes, content_type: str | None, files: tuple[str, ...] = ()) -> dict:
    """The body's fields: text, or bytes for parts sent as files (a filename) and for the fields
    named in `files` whatever they say. "image[]" (a list's form) reads as "image"; a field sent
    twice is refused (one image is edited here)."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequest(f"send the body as multipart/form-data, as OpenAI's image edit API takes it "
                             f"(got Content-Type {str(content_type or 'none')[:80]})")
    match = BOUNDARY.search(content_type.partition(";")[2])
    boundary = match and (match.group(1) if match.group(1) is not None else match.group(2))
    if not boundary or len(boundary) > 200:
        raise InvalidRequest("the multipart/form-data Content-Type names no boundary (of 1 to 200 characters)")
    out = {}
    for head, data in parts(raw, b"--" + boundary.encode("latin-1", "replace")):
        name, filename = disposition(head)
        if name is None:
            continue
        name = name.removesuffix("[]")
        if name in out:
            raise InvalidRequest(f"form field {name[:40]!r} is sent twice; this server takes one of each "
                                 "(one image is edited at a time)")
        if filename is None and name not in files:
            if len(data) > MAX_TEXT:
                raise InvalidRequest(f"form field {name[:40]!r} holds {len(data)} bytes of text; at most {MAX_TEXT}")
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"form field {name[:40]!r} is not UTF-8 text") from None
        out[name] = data
    return out


def delimiter_at(raw: bytes, delimiter: bytes, pos: int) -> int:
    """Where the next delimiter line starts from `pos` (at the body's start or after a CRLF, and
    followed by "--" or the line's end, as RFC 2046 frames parts; content that only begins like
    one is content), or -1. One regular expression, so that the search runs in C whatever the body."""
    pattern = DELIMITERS.get(delimiter)
    if pattern is None:  # a literal start: re finds it as fast as bytes.find
        pattern = DELIMITERS[delimiter] = re.compile(re.escape(b"\r\n" + delimiter) + rb"(?=--|[ \t]*(?:\r\n|$))")
    if pos == 0 and raw.startswith(delimiter) and pattern.match(b"\r\n" + raw[:len(delimiter) + 2 + 256]):
        return 0
    match = pattern.search(raw, max(pos - 2, 0))
    return -1 if match is None else match.start() + 2


def parts(raw: bytes, delimiter: bytes):
    """Yield (headers as text, content) of each part between the delimiters, the content sliced
    once from the body (a body cut off before its closing delimiter: what came of its last part)."""
    at = delimiter_at(raw, delimiter, 0)
    if at < 0:
        raise InvalidRequest("the multipart/form-data body could not be read (its boundary never appears)")
    count = 0
    while not raw.startswith(b"--", at + len(delimiter)):  # "--" after a delimiter closes the body
        line = raw.find(b"\r\n", at + len(delimiter))
        if line < 0:
            return
        start = line + 2
        following = delimiter_at(raw, delimiter, start)
        end = len(raw) if following < 0 else following - 2  # the CRLF before a delimiter is the delimiter's
        count += 1
        if count > MAX_PARTS:
            raise InvalidRequest(f"the form has more than {MAX_PARTS} parts")
        if raw.startswith(b"\r\n", start):  # no headers at all
            head_end = start - 2
        else:
            head_end = raw.find(b"\r\n\r\n", start, min(end, start + MAX_HEAD + 4))
            if head_end < 0:
                raise InvalidRequest(f"a form part's headers are missing their end (a blank line, CRLF), or are "
                                     f"longer than {MAX_HEAD} bytes")
        yield raw[start:max(head_end, start)].decode("latin-1"), raw[head_end + 4:max(end, head_end + 4)]
        if following < 0:
            return
        at = following


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
        if isinstance(value, str) and len(value) > 32:
            raise InvalidRequest(f"{name} must be a number, got {value[:40]!r}...")
        if isinstance(value, str):
            try:
                out[name] = kind(value.strip())
            except ValueError:
                raise InvalidRequest(f"{name} must be a {'whole number' if kind is int else 'number'}, "
                                     f"got {value[:40]!r}") from None
    return out
