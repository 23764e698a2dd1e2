"""Where agentgate relies on a dependency beyond its documented interface: here, and only here.

Each item names the version it was checked against; ``tests/test_compat.py`` fails loudly when
a dependency changes under it.

- **python-telegram-bot 22.8: Telegram Passport's optional ``cryptography`` import.** PTB
  imports ``cryptography``, when installed, only to decrypt Telegram Passport data (its
  optional ``passport`` extra), which the guardian never asks for. PTB guards it with
  ``try: ... except ImportError`` (``telegram._passport.credentials.CRYPTO_INSTALLED``), so
  hiding the package while PTB is first imported leaves PTB as it is without the extra.
  ``import cryptography`` works again afterwards: the audit log's key (:mod:`agentgate.auditkey`)
  then loads its Ed25519 alone. Since the gateway needs ``cryptography`` itself, this no
  longer saves the whole package (~7 MiB of resident memory, now paid) but what Passport
  would add to it: its ciphers, RSA, padding and serialization, ~2 MiB (docs/performance.md,
  S7).

- **trio 0.35.0: ``wait_all_tasks_blocked`` from ``trio._core``.** Its public home is
  ``trio.testing``, but importing ``trio.testing`` also imports pytest wherever pytest is
  installed (for ``RaisesGroup``): ~6 MiB of resident memory in a gateway that never tests
  anything. ``trio.testing`` re-exports the very function ``trio._core`` defines; the Telegram
  guardian's poller uses it to let the presses it brought settle.

- **python-telegram-bot 22.8: a Bot API method's coroutine awaited on Trio.** PTB documents
  its ``Bot`` for asyncio, but from a method such as ``Bot.send_message`` down to
  ``BaseRequest.do_request`` it awaits nothing else: no asyncio future, lock or loop call
  (only ``Bot.initialize`` and ``Bot.shutdown`` use ``asyncio.gather``). Its request object
  being :class:`~agentgate.guardian._trio_request.TrioRequest`, whose HTTP is Trio's anyway, the
  Telegram guardian awaits those coroutines in its Trio task (:func:`bot_call_on_trio`) instead
  of handing each to the asyncio loop and back (two trio-asyncio hops per Bot API call, on
  the path of every card). PTB's ``Application`` (the handlers, the update queue) stays on asyncio.

- **httpx 0.28.1 and httpcore 1.0.9: their optional imports.** ``import httpx`` also imports
  its command line client (``httpx._main``, for the ``httpx`` command: click, then pygments and
  rich, wherever they happen to be installed) inside ``try: ... except ImportError``, and
  httpcore imports its HTTP/2 connections (``h2``, which Hypercorn installs) the same way. The
  gateway runs neither: the command is not agentgate's, and its clients speak HTTP/1.1
  (``http2`` is never set). :func:`import_httpx_without_extras` hides ``httpx._main`` and
  ``h2`` while httpx is first imported, so both take their fallbacks (a ``main`` that says
  what to install; an HTTP/2 connection class that raises if ever built): ~1-3 MiB of
  resident memory (docs/performance.md, S7). ``import h2`` works again afterwards, for
  Hypercorn (``[mcp]``).

Imports: guardian.telegram (when asked to).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TypeVar

from trio._core import wait_all_tasks_blocked  # type: ignore[attr-defined]  # see above

__all__ = [
    "BOT_CALL_ON_TRIO",
    "bot_call_on_trio",
    "import_httpx_without_extras",
    "import_telegram_without_passport",
    "wait_all_tasks_blocked",
]

T = TypeVar("T")

# True while a Bot API call runs in a Trio task (bot_call_on_trio): its request object then
# does its HTTP right there, with no hop through the asyncio loop.
BOT_CALL_ON_TRIO: ContextVar[bool] = ContextVar("agentgate_bot_call_on_trio", default=False)


async def bot_call_on_trio(call: Callable[[], Awaitable[T]]) -> T:
    """Await ``call()``, a PTB ``Bot`` method's coroutine, in the current Trio task (see
    above). Its request object must be a ``TrioRequest``."""
    token = BOT_CALL_ON_TRIO.set(True)
    try:
        return await call()
    finally:
        BOT_CALL_ON_TRIO.reset(token)


def _import_hiding(modules: tuple[str, ...], hidden: tuple[str, ...]) -> None:
    """Import ``modules`` with the modules ``hidden`` unimportable meanwhile: a None entry in
    ``sys.modules`` makes their import raise ModuleNotFoundError (an ImportError). Plain
    imports when one of ``modules``, or of ``hidden``, is already imported."""
    hide = not any(name in sys.modules for name in modules + hidden)
    if hide:
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]
    try:
        for module in modules:
            __import__(module)
    finally:
        if hide:
            for name in hidden:
                if sys.modules.get(name, False) is None:
                    del sys.modules[name]


def import_httpx_without_extras() -> None:
    """Import httpx without its command line client and httpcore's HTTP/2 (see above)."""
    # httpx imports httpcore only when its first client is made: import it here, hidden too.
    _import_hiding(("httpx", "httpcore"), ("httpx._main", "h2"))


def import_telegram_without_passport() -> None:
    """Import the Telegram guardian with PTB's Passport support left out (see above), and
    httpx without its extras.

    A plain import when PTB or ``cryptography`` is already imported.
    """
    import_httpx_without_extras()
    hide = "telegram" not in sys.modules and "cryptography" not in sys.modules
    if hide:
        # A None entry makes `import cryptography...` raise ModuleNotFoundError: PTB's fallback.
        sys.modules["cryptography"] = None  # type: ignore[assignment]
    try:
        import agentgate.guardian.telegram  # noqa: F401
    finally:
        if hide and sys.modules.get("cryptography", False) is None:
            del sys.modules["cryptography"]
