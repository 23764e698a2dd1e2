"""Wait until a just-started Home Assistant answers RUNNING, then describe it as JSON.

Usage: python wait_ready.py URL TOKEN PID DEADLINE_SECONDS OUT_JSON

Polls GET /api/config with the token until ``"state": "RUNNING"`` (every integration set up),
failing fast if the process PID dies or the token is refused. On success writes OUT_JSON
``{"url", "token", "pid", "version", "seconds"}`` and prints the version. Stdlib only: the
HA venv is not guaranteed to hold httpx.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def alive(pid: int) -> bool:
    """True while PID exists and is not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def main(url: str, token: str, pid: int, deadline_s: float, out: Path) -> None:
    start = time.monotonic()
    request = urllib.request.Request(
        url + "/api/config", headers={"Authorization": f"Bearer {token}"}
    )
    last = "no answer yet"
    while time.monotonic() - start < deadline_s:
        if not alive(pid):
            sys.exit(f"hass (pid {pid}) exited during start-up ({last})")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                config = json.load(response)
            last = f"state {config.get('state')!r}"
            if config.get("state") == "RUNNING":
                info = {
                    "url": url,
                    "token": token,
                    "pid": pid,
                    "version": config.get("version"),
                    "seconds": round(time.monotonic() - start, 2),
                }
                out.write_text(json.dumps(info, indent=2) + "\n")
                print(info["version"])
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                sys.exit("Home Assistant refused the seeded token (401)")
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    sys.exit(f"Home Assistant not RUNNING after {deadline_s:.0f} s ({last})")


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5]))
