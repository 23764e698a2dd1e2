"""A real Kinto (Mozilla's self-hostable JSON store) on 127.0.0.1, for the HTTP-service tests.

Run as a process: ``python -m tests.kinto_app`` prints ``PORT`` once it listens, and serves
until stdin closes. Kinto itself (memory backends, basic auth: any user name and password
is an account) answers every path under ``/v1``; two paths in front of it stand for what a
real deployment can do and Kinto does not: ``/v1/__away__`` redirects to another host
(127.0.0.2), ``/v1/__slow__`` answers after 30 s. ``HITS`` counts each method and path that
reached the server (``GET /v1/__hits__`` answers them as JSON), so a test can prove that a
refused call sent nothing and an approved one was sent once.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from collections import Counter
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

HITS: Counter[str] = Counter()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def app() -> Any:
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    import kinto

    settings = {
        "kinto.storage_backend": "kinto.core.storage.memory",
        "kinto.permission_backend": "kinto.core.permission.memory",
        "kinto.cache_backend": "kinto.core.cache.memory",
        "kinto.userid_hmac_secret": "agentgate-tests-" + "x" * 32,
        "multiauth.policies": "basicauth",
        "kinto.bucket_create_principals": "system.Authenticated",
    }
    inner = kinto.main({}, **settings)

    def outer(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path != "/v1/__hits__":
            HITS[f"{environ['REQUEST_METHOD']} {path}"] += 1
        if path == "/v1/__hits__":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(dict(HITS)).encode()]
        if path == "/v1/__away__":
            port = environ["SERVER_PORT"]
            start_response("302 Found", [("Location", f"http://127.0.0.2:{port}/v1/")])
            return [b""]
        if path == "/v1/__slow__":
            time.sleep(30)
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b"{}"]
        return inner(environ, start_response)

    return outer


def main() -> None:
    server = make_server("127.0.0.1", 0, app(), server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_port, flush=True)
    sys.stdin.read()  # until the test closes it
    server.shutdown()


if __name__ == "__main__":
    main()
