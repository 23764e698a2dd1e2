"""What ``agentgate serve`` needs from the machine, checked without starting anything.

``agentgate config check`` runs these checks after :func:`~agentgate.config.load_config`, and
``serve`` runs them before it starts, so a problem reads the same in both and names its key:

- ``gateway.listen``: the address can be bound now (else: who holds it, or why not), and it
  is a loopback address when the gateway runs ``--insecure``;
- ``store.path``: the file is a readable and writable SQLite file, or can be created (its
  directory exists and is writable, or can be created);
- ``gateway.tls_cert`` / ``gateway.tls_key``: readable, PEM, a certificate and an unencrypted
  private key (not swapped), and the key belongs to the certificate.

:func:`server_tls_context` is the one place the gateway loads its certificate; it raises
:class:`~agentgate.config.ConfigError` naming the key, never a bare ``ssl.SSLError``.

Imports: config.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl
import stat
import tempfile
from pathlib import Path
from typing import Final, NamedTuple

from agentgate.config import Config, ConfigError

__all__ = [
    "Finding",
    "check_listen",
    "check_machine",
    "check_store",
    "check_tls",
    "holder",
    "is_loopback",
    "server_tls_context",
]

SQLITE_MAGIC: Final = b"SQLite format 3\x00"


class Finding(NamedTuple):
    """One thing found: its key (``gateway.listen``), what is wrong, and whether it stops
    the gateway (an error) or only deserves attention (a warning)."""

    key: str
    message: str
    error: bool = True

    def line(self, config: Config) -> str:
        """``gate.toml: KEY: MESSAGE``, the file named as :class:`ConfigError` names it."""
        return f"{display(config.source)}: {self.key}: {self.message}"


def display(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    try:
        return os.fspath(path.relative_to(Path.cwd()))
    except ValueError:
        return os.fspath(path)


def check_machine(config: Config, *, insecure: bool, bind: bool = True) -> list[Finding]:
    """Every check of this module that applies (``bind=False`` skips the listen address,
    e.g. while the gateway itself holds it)."""
    found: list[Finding] = []
    doors = [("gateway.listen", "ws://", config.gateway.host, config.gateway.port)]
    if config.mcp is not None:
        doors.append(("mcp.listen", "http://", config.mcp.host, config.mcp.port))
    for key, scheme, host, port in doors:
        if insecure and not is_loopback(host):
            found.append(
                Finding(
                    key,
                    f"--insecure serves plain {scheme} (tokens and requests in clear text) and"
                    f" is only allowed on a loopback address (127.0.0.1 or [::1]), not {host};"
                    " give the gateway tls_cert and tls_key, or put a TLS proxy on this host",
                )
            )
        elif bind:
            problem = check_listen(host, port)
            if problem:
                found.append(Finding(key, problem))
    problem = check_store(config.store.path)
    if problem:
        found.append(Finding("store.path", problem))
    if not insecure and config.gateway.tls_cert and config.gateway.tls_key:
        found += check_tls(config.gateway.tls_cert, config.gateway.tls_key)
    return found


# --- the listen address -----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` only ever means this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now, or None. Binds each address the gateway
    would (as Trio does: SO_REUSEADDR, IPv6 only on IPv6 sockets) and lets go at once."""
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return f"cannot listen on {where}: the host name does not resolve ({exc.strerror})"
    except UnicodeError:
        return f"cannot listen on {where}: not a valid host name"
    for family, kind, proto, _, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            return f"cannot listen on {where}: {_bind_failure(exc, port)}"
        finally:
            sock.close()
    return None


def _bind_failure(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"the port is already in use by {holder(port)}; stop it or choose another port"
    if exc.errno == errno.EACCES:
        return (
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE;"
            " the default 8443 needs neither)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no network interface of this machine has that address"
    return exc.strerror or str(exc)


def holder(port: int) -> str:
    """Who listens on TCP ``port``: ``pid 1234 (agentgate serve gate.toml)`` when this user
    may see it (Linux ``/proc``), else how to find out."""
    inodes = _listening_inodes(port)
    if inodes:
        for pid, command in _processes_with(inodes):
            return f"pid {pid} ({command})"
    hint = f"`ss -ltnp 'sport = :{port}'` shows it"
    if inodes:
        return f"a process of another user ({hint}, as root)"
    return f"another process ({hint})"


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A":  # LISTEN
                        local_port = int(fields[1].rpartition(":")[2], 16)
                        if local_port == port:
                            inodes.add(fields[9])
        except (OSError, ValueError):
            continue
    return inodes


def _processes_with(inodes: set[str]) -> list[tuple[int, str]]:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found: list[tuple[int, str]] = []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in sorted(pids):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
                found.append((pid, _command_line(pid)))
        except OSError:  # another user's process, or gone meanwhile
            continue
    return found


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read(400)
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    python = words and os.path.basename(words[0]).startswith("python")
    if python and len(words) > 1 and not words[1].startswith("-"):
        words = words[1:]  # "python .../agentgate serve": the script says more
    text = " ".join(os.path.basename(words[0]) if i == 0 else w for i, w in enumerate(words))
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 80 else text[:79] + "…"


# --- the store --------------------------------------------------------------------------------


def check_store(path: Path) -> str | None:
    """Why the gateway could not open (or create) its store at ``path``, or None.

    Writability is tried, not inferred from mode bits (which say yes to root everywhere, even
    on a read-only file system): a temporary file is created and removed in the directory.
    """
    if path.exists():
        if not path.is_file():
            return f"{path} is not a file"
        try:
            with path.open("r+b") as file:
                head = file.read(len(SQLITE_MAGIC))
        except OSError as exc:
            return f"cannot open {path} for reading and writing: {exc.strerror} ({_owner(path)})"
        if head and head != SQLITE_MAGIC:
            return f"{path} is not an agentgate store (not an SQLite file)"
        why = _unwritable(path.parent)
        if why:
            return (
                f"cannot write in {path.parent} ({why}); SQLite keeps {path.name}-wal and"
                f" {path.name}-shm beside the store"
            )
        return None
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create {path}: {existing} is not a directory"
    why = _unwritable(existing)
    if why:
        what = f"{path.name} in {existing}" if existing == path.parent else str(path.parent)
        return f"cannot create {what}: {existing}: {why}"
    return None


def _unwritable(directory: Path) -> str | None:
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".agentgate-check-"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _owner(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return "?"
    return f"owned by uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"


# --- TLS --------------------------------------------------------------------------------------


def check_tls(cert: Path, key: Path) -> list[Finding]:
    """Problems with the certificate and key files, and a warning for a key other users may
    read."""
    try:
        _load_tls(cert, key)
    except _TlsProblems as exc:
        return exc.found
    try:
        mode = stat.S_IMODE(key.stat().st_mode)
    except OSError:
        return []
    if mode & 0o077:
        return [
            Finding(
                "gateway.tls_key",
                f"{key} can be read by other users (mode {mode:04o}): chmod 600 {key}",
                error=False,
            )
        ]
    return []


def server_tls_context(config: Config) -> ssl.SSLContext:
    """The gateway's TLS server context from ``[gateway] tls_cert`` and ``tls_key``; raises
    :class:`ConfigError` naming the file, the key and why."""
    cert, key = config.gateway.tls_cert, config.gateway.tls_key
    if cert is None or key is None:
        missing = "gateway.tls_cert" if cert is None else "gateway.tls_key"
        raise ConfigError(
            Finding(missing, "required (TLS is mandatory; plain ws:// only with --insecure)").line(
                config
            )
        )
    try:
        return _load_tls(cert, key)
    except _TlsProblems as exc:
        raise ConfigError(*(finding.line(config) for finding in exc.found)) from exc


class _TlsProblems(Exception):
    def __init__(self, *found: Finding) -> None:
        super().__init__(*found)
        self.found = list(found)


def _read_pem(key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise _TlsProblems(Finding(key, f"cannot read {path}: {exc.strerror}")) from exc


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key, and a
    # gateway started by systemd would wait for ever.
    raise ValueError("the key is encrypted")


def _load_tls(cert: Path, key: Path) -> ssl.SSLContext:
    cert_text = _read_pem("gateway.tls_cert", cert)
    key_text = _read_pem("gateway.tls_key", key)
    found = []
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        swapped = " (tls_cert and tls_key swapped?)" if "PRIVATE KEY-----" in cert_text else ""
        found.append(Finding("gateway.tls_cert", f"{cert} holds no PEM certificate{swapped}"))
    if "PRIVATE KEY-----" not in key_text:
        swapped = " (tls_cert and tls_key swapped?)" if "BEGIN CERTIFICATE" in key_text else ""
        found.append(Finding("gateway.tls_key", f"{key} holds no PEM private key{swapped}"))
    elif "ENCRYPTED" in key_text:
        found.append(
            Finding(
                "gateway.tls_key",
                f"{key} is encrypted with a passphrase; the gateway needs it unencrypted"
                f" (openssl pkey -in {key} -out gate-plain.key, then chmod 600)",
            )
        )
    if found:
        raise _TlsProblems(*found)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            mismatch = f"{key} is not the private key of the certificate in {cert}"
            raise _TlsProblems(Finding("gateway.tls_key", mismatch)) from exc
        why = f"OpenSSL cannot load {cert} with {key}: {exc.reason or exc.strerror or exc}"
        raise _TlsProblems(Finding("gateway.tls_cert", why)) from exc
    except (OSError, ValueError) as exc:
        why = f"cannot load {cert} with {key}: {exc}"
        raise _TlsProblems(Finding("gateway.tls_cert", why)) from exc
    return context
