"""``make test-mcp``: the official MCP conformance suite against agentgate's HTTP endpoint.

Installs ``@modelcontextprotocol/conformance`` (pinned below) with npm into
``.cache/mcp-conformance`` (once; and Node.js 22 from the npm registry when the system's node
is older: the suite needs 22), starts a real gateway with ``[mcp]`` over TLS in front of the
fake Home Assistant, and runs every server scenario that applies to a tools-only server. The
suite has no option for a bearer token: ``mcpconformance/auth.mjs`` adds the agent's token to
its requests (and ``NODE_EXTRA_CA_CERTS`` makes it trust the throw-away CA).

Every server scenario the suite lists must be in APPLIES or in NOT_APPLICABLE (with its reason,
as docs/mcp.md lists them), so a new suite version cannot add scenarios silently. Exits 0 when
every applicable scenario passes; prints ``N passed, M failed`` last.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentgate.testing.fake_homeassistant import run_fake_homeassistant  # noqa: E402
from agentgate.testing.harness import running_gateway  # noqa: E402

SUITE_VERSION = "0.1.16"
NODE_MAJOR = 22
CACHE = Path(os.environ.get("AGENTGATE_MCP_CONFORMANCE_CACHE", ROOT / ".cache" / "mcp-conformance"))
AUTH = ROOT / "scripts" / "mcpconformance" / "auth.mjs"

APPLIES = [
    "server-initialize",
    "ping",
    "tools-list",
    "server-sse-multiple-streams",
    "server-sse-polling",
]
_FIXED_TOOL = (
    "calls the suite's own test tool, which a gateway does not offer (its tools are the gateway's)"
)
NOT_APPLICABLE = {
    "logging-set-level": (
        "no logging capability (a tools-only server; logging is deprecated in 2026-07-28)"
    ),
    "completion-complete": "no prompts or resource templates to complete",
    "tools-call-simple-text": _FIXED_TOOL,
    "tools-call-image": _FIXED_TOOL,
    "tools-call-audio": _FIXED_TOOL,
    "tools-call-embedded-resource": _FIXED_TOOL,
    "tools-call-mixed-content": _FIXED_TOOL,
    "tools-call-with-logging": _FIXED_TOOL,
    "tools-call-error": _FIXED_TOOL,
    "tools-call-with-progress": _FIXED_TOOL,
    "tools-call-sampling": _FIXED_TOOL + "; and the gateway never asks the client for sampling",
    "tools-call-elicitation": _FIXED_TOOL + "; and the gateway never elicits from the client",
    "json-schema-2020-12": _FIXED_TOOL,
    "elicitation-sep1034-defaults": "the gateway never elicits from the client",
    "elicitation-sep1330-enums": "the gateway never elicits from the client",
    "resources-list": "no resources (a tools-only server)",
    "resources-read-text": "no resources (a tools-only server)",
    "resources-read-binary": "no resources (a tools-only server)",
    "resources-templates-read": "no resources (a tools-only server)",
    "resources-subscribe": "no resources (a tools-only server)",
    "resources-unsubscribe": "no resources (a tools-only server)",
    "prompts-list": "no prompts (a tools-only server)",
    "prompts-get-simple": "no prompts (a tools-only server)",
    "prompts-get-with-args": "no prompts (a tools-only server)",
    "prompts-get-embedded-resource": "no prompts (a tools-only server)",
    "prompts-get-with-image": "no prompts (a tools-only server)",
    "dns-rebinding-protection": (
        "for localhost servers without HTTPS and without authentication; agentgate requires TLS"
        " and a bearer token, and refuses an Origin not in allowed_origins (403)"
    ),
}


def _node_major(node: str) -> int:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return 0
    match = re.match(r"v(\d+)", out.stdout.strip())
    return int(match.group(1)) if match else 0


def _install() -> tuple[str, Path]:
    """Node.js (>= 22) and the suite's entry point, installed into CACHE once."""
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("make test-mcp needs npm (and the npm registry) to install the conformance suite")
    packages = [f"@modelcontextprotocol/conformance@{SUITE_VERSION}"]
    system_node = shutil.which("node")
    node = system_node if system_node and _node_major(system_node) >= NODE_MAJOR else None
    if node is None:
        arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
            platform.machine().lower()
        )
        if arch is None:
            sys.exit(f"no Node.js {NODE_MAJOR} package for {platform.machine()}: install node 22+")
        packages.append(f"node-linux-{arch}@{NODE_MAJOR}")
        node = str(CACHE / "node_modules" / f"node-linux-{arch}" / "bin" / "node")
    entry = CACHE / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    stamp = CACHE / f".installed-{'-'.join(p.replace('/', '_') for p in packages)}"
    if not stamp.exists() or not entry.exists() or not Path(node).exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"installing {' '.join(packages)} into {CACHE}", flush=True)
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(CACHE),
                "--no-audit",
                "--no-fund",
                "--silent",
                *packages,
            ],
            check=True,
        )
        stamp.touch()
    return node, entry


def _listed(node: str, entry: Path) -> list[str]:
    out = subprocess.run([node, str(entry), "list"], capture_output=True, text=True, check=True)
    scenarios, server = [], False
    for line in out.stdout.splitlines():
        if line.startswith("Server scenarios"):
            server = True
        elif line and not line.startswith(" "):
            server = False
        elif server and line.strip().startswith("- "):
            scenarios.append(line.strip()[2:].split(" ")[0])
    return scenarios


async def _run(node: str, entry: Path) -> int:
    listed = _listed(node, entry)
    unknown = [s for s in listed if s not in APPLIES and s not in NOT_APPLICABLE]
    missing = [s for s in APPLIES if s not in listed]
    if unknown or missing:
        print(f"scenarios not classified: {unknown}; applicable but not listed: {missing}")
        return 1
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="agentgate-mcp-conformance-") as tmp:
        async with (
            run_fake_homeassistant() as home,
            running_gateway(Path(tmp) / "gate", home=home, mcp={"wait": 5}) as gw,
        ):
            env = {
                **os.environ,
                "NODE_EXTRA_CA_CERTS": str(gw.ca_path),
                "AGENTGATE_MCP_TOKEN": gw.tokens["pi"],
                "AGENTGATE_MCP_URL": gw.mcp_url,
            }
            print(f"gateway MCP endpoint: {gw.mcp_url}", flush=True)
            for scenario in APPLIES:
                command = [node, "--import", str(AUTH), str(entry), "server"]
                command += ["--url", gw.mcp_url, "--scenario", scenario]
                with trio.fail_after(120):
                    done = await trio.run_process(
                        command, env=env, capture_stdout=True, capture_stderr=True, check=False
                    )
                output = done.stdout.decode(errors="replace")
                ok = done.returncode == 0 and re.search(r"\b0 failed\b", output) is not None
                passed += ok
                failed += not ok
                summary = re.findall(r"Passed: .*", output)
                print(f"{'PASS' if ok else 'FAIL'}  {scenario}  {summary[-1] if summary else ''}")
                if not ok:
                    print(output[-4000:], done.stderr.decode(errors="replace")[-2000:])
    for scenario, reason in NOT_APPLICABLE.items():
        print(f"n/a   {scenario}: {reason}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def main() -> int:
    node, entry = _install()
    return trio.run(_run, node, entry)


if __name__ == "__main__":
    sys.exit(main())
