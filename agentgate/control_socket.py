"""The operator's control socket: ``agentgate reload``, ``grants --revoke`` and ``undo`` ask the
running gateway to act, and hear how it went.

A Unix socket (default ``agentgate.sock`` next to the store; ``[gateway] control_socket``),
mode 0600, whose peers must run as the gateway's own user (checked with ``SO_PEERCRED`` where
the system has it): whoever can use it could also read the store and the configuration. One
JSON line in, one JSON line out, then the connection closes::

    {"command": "ping"}                                     {"ok": true, "pid", "config"}
    {"command": "reload", "config": PATH, "user": NAME}     {"ok", "message", "lines", ...}
    {"command": "revoke", "grant_id": ID, "user": NAME}     {"ok", "message"}
    {"command": "undo", "request_id": ID, "confirm": BOOL,  {"ok", "message", "check"}
     "user": NAME}

What the gateway does is what a guardian's press or ``SIGHUP`` does (the same controls, the
same audit rows); the audit log names the operator as ``NAME (shell, uid N)``. The socket is
removed when the gateway stops; a socket left by a gateway that was killed is replaced at the
next start (one that still answers is left alone, and this gateway serves none).

Imports: inert (names made safe), gateway's parts (the controls, the reloader). The client half
(:func:`request`) is plain blocking Python, for the command line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from agentgate.inert import inert

if TYPE_CHECKING:
    from agentgate.gateway import Gateway

__all__ = ["ControlUnavailable", "request", "serve_control"]

log = logging.getLogger(__name__)

MAX_LINE: Final = 65536  # bytes of one request
READ_DEADLINE: Final = 5.0  # seconds for a peer to send its request
NAME_LIMIT: Final = 64


class ControlUnavailable(Exception):
    """No running gateway answers on the control socket (the message says why)."""


# -- the gateway's side -------------------------------------------------------------------------


async def serve_control(
    gateway: Gateway,
    path: Path,
    *,
    task_status: trio.TaskStatus[Path | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled; ``nursery.start`` returns the path,
    or None when it cannot be served (logged: the gateway runs without it)."""
    sock = await _bind(path)
    if sock is None:
        task_status.started(None)
        return
    inode = os.stat(path).st_ino
    try:
        listener = trio.SocketListener(sock)
        task_status.started(path)
        log.info("control socket on %s", path)

        async def handler(stream: trio.SocketStream) -> None:
            await _serve_one(gateway, stream)

        await trio.serve_listeners(handler, [listener])
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:  # still ours: not replaced by a later gateway
                os.unlink(path)


async def _bind(path: Path) -> trio.socket.SocketType | None:
    if not hasattr(socket, "AF_UNIX"):
        log.warning("no control socket on this system: agentgate reload/undo cannot reach it")
        return None
    where = trio.Path(path)
    if await where.exists() or await where.is_symlink():
        if await _answers(path):
            log.warning(
                "another gateway answers on the control socket %s: this one serves none", path
            )
            return None
        with contextlib.suppress(OSError):
            os.unlink(path)  # left by a gateway that was killed
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no moment when others could connect
    try:
        os.makedirs(path.parent, exist_ok=True)
        await sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        log.warning(
            "no control socket at %s (%s): agentgate reload, grants --revoke and undo cannot"
            " reach this gateway (set [gateway] control_socket to a shorter path); SIGHUP"
            " still reloads",
            path,
            exc.strerror or exc,
        )
        return None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


async def _answers(path: Path) -> bool:
    try:
        stream = await trio.open_unix_socket(os.fspath(path))
    except OSError:
        return False
    await stream.aclose()
    return True


def _peer_uid(stream: trio.SocketStream) -> int | None:
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None  # not Linux: the socket's mode 0600 is the check
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", raw)
    return int(uid)


async def _serve_one(gateway: Gateway, stream: trio.SocketStream) -> None:
    async with stream:
        uid = _peer_uid(stream)
        if uid is not None and uid != os.getuid():
            log.warning("control socket: refused a peer running as uid %d", uid)
            await _send(stream, {"ok": False, "message": "not the gateway's user"})
            return
        try:
            line = await _read_line(stream)
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError, trio.TooSlowError) as exc:
            await _send(stream, {"ok": False, "message": f"bad request: {exc}"})
            return
        user = message.get("user")
        name = inert(user[:NAME_LIMIT]) if isinstance(user, str) and user else "operator"
        by = f"{name} (shell, uid {uid if uid is not None else os.getuid()})"
        try:
            answer = await _dispatch(gateway, message, by)
        except Exception as exc:
            log.exception("control socket: %r failed", message.get("command"))
            answer = {"ok": False, "message": f"failed: {exc!r} (see the gateway's log)"}
        await _send(stream, answer)


async def _read_line(stream: trio.SocketStream) -> str:
    data = bytearray()
    with trio.fail_after(READ_DEADLINE):
        while b"\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_LINE:
                raise ValueError(f"request over {MAX_LINE} bytes")
    return data.split(b"\n", 1)[0].decode("utf-8")


async def _send(stream: trio.SocketStream, answer: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(json.dumps(answer).encode() + b"\n")


async def _dispatch(gateway: Gateway, message: dict[str, Any], by: str) -> dict[str, Any]:
    command = message.get("command")
    if command == "ping":
        return {"ok": True, "pid": os.getpid(), "config": os.fspath(gateway.config.source)}
    if command == "reload":
        asked = message.get("config")
        if isinstance(asked, str) and not _same_file(asked, gateway.config.source):
            return {
                "ok": False,
                "message": f"this gateway serves {gateway.config.source}, not {asked}",
            }
        result = await gateway.reloader.reload(by)
        return {
            "ok": result.ok,
            "message": "reloaded" if result.ok else "reload failed: the old configuration stays",
            "lines": list(result.lines),
            "restart": list(result.restart),
            "closed": result.closed,
        }
    if command == "revoke":
        grant_id = message.get("grant_id")
        if not isinstance(grant_id, str) or not grant_id:
            return {"ok": False, "message": "revoke needs a grant_id"}
        revoked = await gateway.controls.revoke_grant(grant_id, by)
        text = "grant revoked" if revoked else f"no active grant {grant_id}"
        return {"ok": revoked, "message": text}
    if command == "undo":
        request_id = message.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            return {"ok": False, "message": "undo needs a request_id"}
        done = await gateway.controls.run_undo(
            request_id, by, confirm=message.get("confirm") is True
        )
        return {
            "ok": done.check.value == "undone",
            "message": done.answer,
            "check": done.check.value,
        }
    return {"ok": False, "message": f"unknown command {command!r}"}


def _same_file(asked: str, served: Path) -> bool:
    try:
        return os.path.samefile(asked, served)
    except OSError:
        return False


# -- the command line's side -------------------------------------------------------------------


def request(path: Path, message: dict[str, Any], *, timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to the gateway at ``path`` and return its answer (blocking).

    Raises :class:`ControlUnavailable` when no gateway answers there.
    """
    if not hasattr(socket, "AF_UNIX"):
        raise ControlUnavailable("this system has no Unix sockets")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlUnavailable(
                f"no gateway answers on {path}: is it running (with this gate.toml)?"
            ) from None
        except PermissionError:
            raise ControlUnavailable(
                f"permission denied on {path}: run this as the gateway's user"
            ) from None
        except OSError as exc:
            raise ControlUnavailable(f"cannot reach {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = bytearray()
            while b"\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ControlUnavailable(f"the gateway did not answer within {timeout:g} s") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise ControlUnavailable("the gateway closed the connection") from None
            raise ControlUnavailable(f"cannot reach {path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data.split(b"\n", 1)[0] or b"null")
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlUnavailable("the gateway's answer was not understood")
    return answer
