"""The HTTP server: the standard library's threading server, JSON in and out.

Each connection gets a thread that reads the request, checks it and hands its job to the
one worker thread (worker.py), then waits for the images. Routes are (method, path) ->
function(body) -> (status, JSON value); a route family (AUTOMATIC1111's, OpenAI's) writes its
own error bodies, so that each one's clients read our errors as they read theirs.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from ldm_deploy.errors import InvalidRequest, UserError, renamed
from ldm_deploy.serve.form import parse_form

log = logging.getLogger("ldm-serve")


class HttpError(Exception):
    """Answer with this status and message (in the route family's error body)."""

    def __init__(self, status: int, message: str, kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclass(frozen=True)
class Route:
    handler: Callable  # (body: dict | None) -> (status, JSON value)
    errors: Callable  # (status, message, kind) -> JSON value: the family's error body
    body: bool = False  # takes a JSON object
    # takes a multipart/form-data body (form.py): {field: text or file bytes}; these fields are files
    form: tuple[str, ...] | None = None
    invalid: int = 422  # the status of a request's mistake (a UserError): AUTOMATIC1111's 422, OpenAI's 400
    # Pipeline keywords -> the API's fields, where a mistake's message starts with one (errors.renamed)
    names: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Auth:
    """Who may call: HTTP Basic users (AUTOMATIC1111's --api-auth user:pass,...) and/or Bearer
    keys (OpenAI clients' Authorization: Bearer KEY). Neither: everyone."""

    users: tuple[tuple[str, str], ...] = ()
    keys: tuple[str, ...] = ()

    def allows(self, header: str | None) -> bool:
        if not self.users and not self.keys:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return any(hmac.compare_digest(value.encode(), k.encode()) for k in self.keys)
        if scheme.lower() == "basic" and self.users:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return any(hmac.compare_digest(user.encode(), u.encode()) & hmac.compare_digest(password.encode(), p.encode())
                       for u, p in self.users)
        return False


def plain_error(status: int, message: str, kind: str | None = None) -> dict:
    return {"error": kind or HTTPStatus(status).phrase, "detail": message}


class App:
    """The routes, the limits and the authentication of one server."""

    def __init__(self, routes: dict[tuple[str, str], Route], auth: Auth = Auth(), max_body: int = 64 << 20,
                 open_paths: tuple[str, ...] = ("/health",), metrics=None):
        self.routes, self.auth, self.max_body, self.open_paths = routes, auth, max_body, open_paths
        self.metrics = metrics  # a metrics.Metrics that counts each answer, or None
        self.paths = {p for _, p in routes}
        self.active = 0  # requests being answered (a graceful stop waits for them)
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, headers, raw: bytes, problem: HttpError | None = None
               ) -> tuple[int, object, dict]:
        """A request (its body's bytes, or the problem that kept them from being read) -> (status,
        JSON value, extra headers)."""
        path = path.split("?", 1)[0].rstrip("/") or "/"
        route = self.routes.get((method, path))
        errors = route.errors if route else self.family(path)
        try:
            if problem is not None:
                raise problem
            if route is None:
                if any(p == path for _, p in self.routes):
                    allowed = ", ".join(sorted(m for m, p in self.routes if p == path))
                    raise HttpError(405, f"{path} takes {allowed}, not {method}", headers={"Allow": allowed})
                raise HttpError(404, f"no such endpoint: {method} {path} (GET /docs lists them)")
            if not self.authorized(path, headers):
                raise self.unauthorized()
            body = parse(raw) if route.body else \
                parse_form(raw, headers.get("Content-Type"), route.form) if route.form is not None else None
            status, value = route.handler(body)
            return status, value, {}
        except HttpError as e:
            return e.status, errors(e.status, e.message, e.kind), e.headers
        except UserError as e:  # a mistake in the request: what is wrong and how to fix it
            status = route.invalid if route else 422
            message = renamed(str(e), route.names) if route and isinstance(e, InvalidRequest) else str(e)
            return status, errors(status, message, type(e).__name__), {}

    def authorized(self, path: str, headers) -> bool:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        return path in self.open_paths or self.auth.allows(headers.get("Authorization"))

    def unauthorized(self) -> HttpError:
        scheme = "Basic" if self.auth.users else "Bearer"
        return HttpError(401, "this server needs credentials (ldm-serve --api-auth / --api-key)",
                         headers={"WWW-Authenticate": f'{scheme} realm="ldm-serve"'})

    def family(self, path: str) -> Callable:
        """The error body of the routes under the same first folder (/sdapi, /v1) as `path`."""
        top = "/" + path.split("/")[1]
        return next((r.errors for (_, p), r in self.routes.items() if p.startswith(top + "/")), plain_error)


def body_length(headers, max_body: int) -> int:
    """The body's length from its one Content-Length (none: 0); an HttpError where it cannot be
    read safely (after which the connection is closed: its bytes would be taken for the next request)."""
    if headers.get("Transfer-Encoding"):
        raise HttpError(411, "send the body with a Content-Length, not chunked")
    values = set(headers.get_all("Content-Length") or [])
    if not values:
        return 0
    if len(values) > 1 or not re.fullmatch(r"[0-9]{1,18}", next(iter(values)).strip()):
        raise HttpError(400, f"Content-Length must be one whole number of bytes, got {', '.join(values)}")
    length = int(next(iter(values)))
    if length > max_body:
        raise HttpError(413, f"the body is {length} bytes; this server takes at most {max_body} "
                             "(ldm-serve --max-body-mb)")
    return length


def not_json(name: str):
    """NaN and Infinity, which Python's json reads and strict JSON parsers (clients') refuse."""
    raise ValueError(f"{name} is not a JSON value")


def parse(raw: bytes) -> dict:
    """A JSON object body; a mistake (none, or another value) is the route's own status."""
    if not raw.strip():
        raise InvalidRequest("the body is empty: send a JSON object of the request's fields ({} takes every default)")
    try:
        body = json.loads(raw, parse_constant=not_json)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past Python's stack
        raise HttpError(400, f"the body is not JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be a JSON object of the request's fields, got {type(body).__name__}")
    return body


class Handler(BaseHTTPRequestHandler):
    server_version = "ldm-serve"
    timeout = 60  # seconds an idle kept-alive connection holds its thread
    protocol_version = "HTTP/1.1"  # keep-alive: clients send many requests on one connection

    def do_GET(self):
        self.answer("GET")

    def do_POST(self):
        self.answer("POST")

    def do_PUT(self):  # (no route takes these: answered 405 with the methods that path takes)
        self.answer("PUT")

    def do_DELETE(self):
        self.answer("DELETE")

    def do_PATCH(self):
        self.answer("PATCH")

    def answer(self, method: str) -> None:
        start = time.perf_counter()
        app: App = self.server.app
        with app.lock:
            app.active += 1
        try:
            raw, problem, unread = b"", None, False
            try:
                if not app.authorized(self.path, self.headers):  # no body read for strangers: closed after
                    problem, self.close_connection, unread = app.unauthorized(), True, True
                else:
                    length = body_length(self.headers, app.max_body)
                    raw = self.rfile.read(length)
                    if len(raw) != length:  # cut off: the client went away mid-body
                        self.close_connection = True
                        return
            except HttpError as e:
                problem, self.close_connection, unread = e, True, True
            except OSError:  # the client stalled past `timeout`, or went away: nobody to answer
                self.close_connection = True
                return
            try:
                status, value, headers = app.handle(method, self.path, self.headers, raw, problem)
            except Exception:  # our bug: logged with its traceback, answered as a server error
                log.exception("%s %s failed", method, self.path)
                status, value, headers = 500, plain_error(500, "the server failed; its log says why"), {}
            if app.metrics is not None:  # counted before it is sent: a client that reads it sees it counted
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                app.metrics.request(method, path if path in app.paths else "other", status,
                                    time.perf_counter() - start)
            text = getattr(value, "content_type", None)  # metrics.Text: sent as it is
            data = value.encode() if text else json.dumps(value).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", text or "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                if unread:
                    self.wfile.flush()
                    drain(self.connection)
            except OSError as e:  # the client left before its answer
                self.close_connection = True
                log.info("%s %s %s %d: the client went away before the answer (%s)", self.client_address[0],
                         method, self.path.split("?", 1)[0], status, type(e).__name__)
                return
        finally:
            with app.lock:
                app.active -= 1
        log.info("%s %s %s %d %.2fs", self.client_address[0], method, self.path.split("?", 1)[0], status,
                 time.perf_counter() - start)

    def log_message(self, format, *args):  # the standard library's own lines: ours are above
        log.debug(format, *args)


def drain(connection, seconds: float = 30) -> None:
    """After answering a request whose body was not read: shut our side and read what the client
    still sends (dropped) until it is done, so that it reads the answer rather than a reset
    (closing with data unread resets the connection). At most `seconds`."""
    connection.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + seconds
    connection.settimeout(2)
    try:
        while time.monotonic() < deadline and connection.recv(1 << 16):
            pass
    except OSError:
        pass


BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Retry-After: 5\r\nConnection: close\r\n\r\n%s")


class Server(ThreadingHTTPServer):
    """A thread per connection, up to `max_connections` at once (each holds a thread, and a kept-alive
    idle one holds it for Handler.timeout); past that a connection is answered 503 and closed."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App, max_connections: int = 64):
        if ":" in address[0]:  # an IPv6 address (::1, ::)
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.app = app
        self.max_connections, self.connections = max_connections, 0
        self.count_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self.count_lock:
            full = self.connections >= self.max_connections
            self.connections += not full
        if full:
            log.info("%s: refused, %d connections open", client_address[0], self.max_connections)
            threading.Thread(target=self.refuse, args=(request,), daemon=True).start()
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread to count down (one could not be started)
            with self.count_lock:
                self.connections -= 1
            raise

    def refuse(self, request) -> None:
        """Answer 503 and close so that the client reads it: the answer, our side shut, then what it
        sends read and dropped (closing with its request unread would reset the connection, and
        the client would see that instead of the answer)."""
        if self.app.metrics is not None:
            self.app.metrics.turned_away()
        body = json.dumps(plain_error(503, f"{self.max_connections} connections are open already "
                                           "(ldm-serve --max-connections); try again shortly")).encode()
        try:
            request.sendall(BUSY % (len(body), body))
            drain(request)
        except OSError:
            pass
        finally:
            request.close()

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.count_lock:
                self.connections -= 1

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
