"""The local web app: Python's standard-library HTTP server, a JSON API, static files.

Why http.server: the app serves one person on one machine: a page, three small assets,
images and a handful of JSON calls. `ThreadingHTTPServer` does that with no dependency
to install, pin or audit; a framework (Flask, FastAPI) would add packages and a
template engine for no feature used here.

Routes (nothing else is served; no request path is ever joined to a folder path):

    GET  /                     the page (static/index.html)
    GET  /static/<name>        a file of westar/annotate/static, looked up by exact name
    GET  /image/<i>            image number i of the session (index into the list)
    GET  /api/summary          progress, image list, notes
    GET  /api/image/<i>        samples, answers, existing pairs, conflicts of image i
    POST /api/answer           {"image", "sample", "slot", "relation"}
    POST /api/move             {"image", "sample", "point", "x", "y"}
    POST /api/skip             {"image", "skipped"}
    POST /api/undo             {}

POSTs need Content-Type application/json and every request a Host of this server
(127.0.0.1 / localhost), so other web sites open in the same browser cannot drive it.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from westar.annotate.store import AnnotationSession

__all__ = ["make_server", "static_files"]

_INT_ROUTE = re.compile(r"^/(image|api/image)/(0|[1-9][0-9]{0,8})$")
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def static_files() -> dict[str, bytes]:
    """{name: bytes} of every file shipped in westar/annotate/static (read once)."""
    folder = resources.files("westar.annotate") / "static"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


class _Handler(BaseHTTPRequestHandler):
    session: AnnotationSession
    static: dict[str, bytes]
    allowed_hosts: set[str]
    server_version = "westar-annotate"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal is for errors
        pass

    # ------------------------------------------------------------------ replies

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # other web sites may not embed (and so read) the images or the API's answers
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _host_ok(self) -> bool:
        if self.headers.get("Host", "") in self.allowed_hosts:
            return True
        self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        return False

    # ------------------------------------------------------------------ GET

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._send(200, self.static["index.html"], _STATIC_TYPES[".html"])
        if path.startswith("/static/"):
            name = path[len("/static/") :]
            if name in self.static:
                ext = name[name.rfind(".") :]
                ctype = _STATIC_TYPES.get(ext, "application/octet-stream")
                return self._send(200, self.static[name], ctype)
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        if path == "/api/summary":
            return self._json(self.session.summary())
        m = _INT_ROUTE.match(path)
        if m:
            index = int(m.group(2))
            if not 0 <= index < len(self.session.items):
                return self._error(HTTPStatus.NOT_FOUND, f"no image {index}")
            if m.group(1) == "image":
                try:
                    body, ctype = self.session.image_bytes(index)
                except OSError as err:
                    return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot read: {err}")
                return self._send(200, body, ctype)
            return self._json(self.session.image_state(index))
        self._error(HTTPStatus.NOT_FOUND, "not found")

    do_HEAD = do_GET

    # ------------------------------------------------------------------ POST

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "expected application/json")
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 <= length <= 1 << 16:
                raise ValueError("request too large")
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
        except ValueError as err:
            return self._error(HTTPStatus.BAD_REQUEST, f"bad request: {err}")
        except RecursionError:
            return self._error(HTTPStatus.BAD_REQUEST, "bad request: JSON nested too deeply")
        s = self.session
        path = urlsplit(self.path).path
        try:
            if path == "/api/answer":
                index = body["image"]
                s.answer(index, body["sample"], body["slot"], body["relation"])
            elif path == "/api/move":
                index = body["image"]
                s.move(index, body["sample"], body["point"], [body["x"], body["y"]])
            elif path == "/api/skip":
                index = body["image"]
                s.skip(index, body.get("skipped", True))
            elif path == "/api/undo":
                index = s.undo()
            else:
                return self._error(HTTPStatus.NOT_FOUND, "not found")
        except KeyError as err:
            return self._error(HTTPStatus.BAD_REQUEST, f"missing or unknown {err}")
        except (TypeError, ValueError) as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        except OSError as err:  # the pairs file could not be written: say so in the page
            print(f"westar annotate: error: cannot save {s.out}: {err}", file=sys.stderr)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot save {s.out}: {err}")
        image = s.image_state(index) if index is not None else None
        self._json({"image": image, "summary": s.summary()})


def make_server(session: AnnotationSession, host: str = "127.0.0.1", port: int = 0):
    """A ThreadingHTTPServer for `session` (port 0: any free port; see .server_port).

    Raises ValueError with a clear message when the port is taken or not allowed.
    """
    try:
        server = ThreadingHTTPServer((host, port), _Handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ValueError(
                f"--port {port}: already in use on {host}; choose another (--port 0 picks a free one)"
            ) from err
        raise ValueError(f"--host {host} --port {port}: cannot listen ({err})") from err
    server.daemon_threads = True
    port = server.server_port
    hosts = {f"{host}:{port}", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    handler = type(
        "Handler",
        (_Handler,),
        {"session": session, "static": static_files(), "allowed_hosts": hosts},
    )
    server.RequestHandlerClass = handler
    return server
