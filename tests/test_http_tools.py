"""HTTP tools, fast tier: the tools file's checks, signatures, requests and cards, the
executor's limits (size cap, secrets scrubbed, redirects) over ``httpx.MockTransport``, the
gateway's wiring (list_tools, MCP tools/list), ``config check`` and ``check --config``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from agentgate.cli import main
from agentgate.config import ConfigError, HttpServiceConfig, load_config
from agentgate.errors import ExecutionFailed, InvalidParams
from agentgate.guardian import ApprovalCard
from agentgate.guardian.card import card_layout, render_card
from agentgate.http_tools import load_tools_file
from agentgate.mcp.server import mcp_tools
from agentgate.services.http import open_http_service
from agentgate.tools import build_signature
from tests.fastgate import authed, call, fast_gateway

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tools" / "kinto-shopping.yaml"
SECRET = "s3cret-password-0123"
POLICY = """\
rules:
  - {pattern: "http_shop_list_items*", action: allow}
  - {pattern: "http_shop_add_item(*)", action: ask}
"""


def service(tools: Path, **kw: Any) -> HttpServiceConfig:
    fields: dict[str, Any] = {
        "name": "shop",
        "base_url": "http://shop.test/v1",
        "tools": tools,
        "auth": "basic",
        "username": "gate",
        "password": SECRET,
        **kw,
    }
    return HttpServiceConfig(**fields)


def tools_of(tmp_path: Path, text: str) -> list[Any]:
    path = tmp_path / "tools.yaml"
    path.write_text(text)
    return load_tools_file(path, service(path))


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        tools_of(tmp_path, text)
    return [line.split(": ", 1)[1] for line in info.value.problems]


# --- the tools file ---------------------------------------------------------------------------


def test_the_example_loads() -> None:
    loaded = load_tools_file(EXAMPLE, service(EXAMPLE))
    assert [tool.name for tool in loaded] == [
        "http_shop_list_items",
        "http_shop_add_item",
        "http_shop_remove_item",
    ]


def test_tools_file_errors_name_the_key_path(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
tools:
  - name: Bad-Name
    description: x
    method: FETCH
    path: /items/{id}/../x?y=1
    args:
      id: {type: string, in: query}
      tags: {type: array}
      note: {type: string, text: true, in: path}
      n: {type: integer, pattern: "x"}
    signature: [id]
    colour: red
""",
    )
    assert found == [
        'tools[0]: unknown key "colour" (expected name, description, method, path, args,'
        " signature, read_only, destructive)",
    ]
    found = problems(
        tmp_path,
        """\
tools:
  - name: Bad-Name
    description: x
    method: FETCH
    path: /items/{id}/../x?y=1
    args:
      id: {type: string, in: query}
      tags: {type: array}
      n: {type: integer, pattern: "x"}
    signature: [id]
""",
    )
    assert 'tools[0].name: expected ^[a-z][a-z0-9_]{0,47}$, got "Bad-Name"' in found
    assert 'tools[0].method: expected one of GET, POST, PUT, PATCH, DELETE, got "FETCH"' in found
    assert any(line.startswith("tools[0].path: only letters") for line in found)
    assert "tools[0].args.id.in: {id} is in the path: in must be path" in found
    assert any(line.startswith("tools[0].args.tags.type: expected one of") for line in found)
    assert "tools[0].args.n.pattern: expected a regular expression, for a string" in found
    assert any(line.startswith("tools[0].signature: leaves out") for line in found)


def test_tools_file_must_be_yaml_with_tools(tmp_path: Path) -> None:
    assert problems(tmp_path, "tools: [")[0].startswith("invalid YAML: line")
    assert problems(tmp_path, "other: 1") == [
        "expected a mapping with one key, tools (a list of tools)"
    ]


# --- signatures, requests, cards ---------------------------------------------------------------


def example() -> dict[str, Any]:
    return {tool.name: tool for tool in load_tools_file(EXAMPLE, service(EXAMPLE))}


def test_signatures_are_argument_complete() -> None:
    specs = {name: tool.spec() for name, tool in example().items()}
    note = "two, please (the big ones)?\nthanks"
    sig = build_signature("http_shop_add_item", {"item": "milk", "note": note}, specs=specs)
    assert sig.text.startswith("http_shop_add_item(item=milk, note=sha256:")
    other = build_signature("http_shop_add_item", {"item": "milk", "note": note + "!"}, specs=specs)
    assert other.text != sig.text  # a grant for one note never covers another
    assert build_signature("http_shop_list_items", {}, specs=specs).text == "http_shop_list_items"
    with pytest.raises(InvalidParams, match="item: forbidden character ','"):
        build_signature("http_shop_add_item", {"item": "milk, eggs"}, specs=specs)
    with pytest.raises(InvalidParams, match="unknown argument"):
        build_signature("http_shop_add_item", {"item": "milk", "price": "1"}, specs=specs)
    with pytest.raises(InvalidParams, match="does not match"):
        build_signature("http_shop_remove_item", {"id": "a b"}, specs=specs)


def test_the_request_and_its_card() -> None:
    tool = example()["http_shop_add_item"]
    built = tool.request({"item": "oat milk", "note": "the <b>big</b> one"})
    assert built.url == "http://shop.test/v1/buckets/home/collections/shopping/records"
    assert json.loads(built.body or b"") == {
        "data": {"item": "oat milk", "note": "the <b>big</b> one"}
    }
    preview = tool.spec().preview
    assert preview is not None
    text = preview({"item": "oat milk", "note": "the <b>big</b> one"})
    card = ApprovalCard(
        request_id="r-1",
        agent="pi",
        tool=tool.name,
        args={"item": "oat milk", "note": "the <b>big</b> one"},
        signature="http_shop_add_item(item=oat milk, note=sha256:x)",
        matched="rule 1",
        expires_at=100.0,
        target=text,
    )
    html = render_card(card, now=0.0)
    assert "Request (as it will be sent):\n<pre>POST http://shop.test/v1/buckets/" in html
    assert "Authorization: Basic (gate and the password in gate.toml)" in html
    assert "&lt;b&gt;big&lt;/b&gt;" in html
    assert SECRET not in html
    # the request counts in the card's size: too large is refused before anyone is asked
    big = {**card.args, "note": "x" * 3000}
    large = attrs.evolve(card, args=big, target=preview(big))
    with pytest.raises(Exception, match="too large"):
        card_layout(large, max_chars=4096, overflow="refuse")


def test_path_arguments_are_encoded_or_refused() -> None:
    tool = example()["http_shop_remove_item"]
    assert tool.request({"id": "a#b"}).url.endswith("/records/a%23b")
    for bad in ("..", ".", "", "a/b", "a\\b"):
        with pytest.raises(InvalidParams, match="a path argument cannot"):
            tool.request({"id": bad})


# --- the executor, over a mock transport -------------------------------------------------------


async def run(handler: Any, tool: str, args: dict[str, Any], **kw: Any) -> Any:
    config = service(EXAMPLE, **kw)
    definitions = {t.name: t for t in load_tools_file(EXAMPLE, config)}
    async with open_http_service(
        config, definitions, transport=httpx.MockTransport(handler)
    ) as svc:
        with trio.fail_after(5):
            return await svc.execute(tool, args)


async def test_answers_are_capped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": ["x" * 5000]})

    with pytest.raises(ExecutionFailed, match="more than 1024 bytes: refused"):
        await run(handler, "http_shop_list_items", {}, max_response_bytes=1024)


async def test_secrets_are_scrubbed_from_answers() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"].startswith("Basic ")
        return httpx.Response(200, json={"echo": dict(request.headers), "pw": SECRET})

    answer = await run(handler, "http_shop_list_items", {})
    assert SECRET not in json.dumps(answer)
    assert answer["pw"] == "[redacted]"
    assert answer["echo"]["authorization"] == "Basic [redacted]"


async def test_redirects_stay_on_the_origin() -> None:
    def away(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "https://evil.test/v1/x"})

    with pytest.raises(ExecutionFailed, match=r"redirect to another host \(evil.test\): refused"):
        await run(away, "http_shop_list_items", {})

    def slash(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/"):
            return httpx.Response(200, json={"data": []})
        return httpx.Response(307, headers={"Location": request.url.path + "/"})

    assert await run(slash, "http_shop_list_items", {}) == {"data": []}
    with pytest.raises(ExecutionFailed, match="not followed"):
        await run(slash, "http_shop_add_item", {"item": "milk"})


# --- through the gateway -----------------------------------------------------------------------


def gate_extra(tools: Path) -> str:
    return (
        "\n[services.http.shop]\n"
        'base_url = "http://shop.test/v1"\n'
        f'tools = "{tools}"\n'
        'auth = "bearer"\n'
        'token = "tok-0123456789"\n'
    )


async def test_gateway_lists_and_runs_http_tools(workdir: Path) -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"data": [{"item": "tea"}]})

    async with fast_gateway(
        workdir,
        policy=POLICY,
        extra_toml=gate_extra(EXAMPLE),
        http_transports={"shop": httpx.MockTransport(handler)},
    ) as fg:
        ws = await authed(fg)
        listed = (await call(ws, 1, "list_tools"))["result"]["tools"]
        names = [entry["name"] for entry in listed]
        assert "ha_get_state" in names
        assert "http_shop_add_item" in names
        tools = {tool.name: tool for tool in mcp_tools(listed)}
        assert tools["http_shop_list_items"].annotations.read_only_hint is True
        remove = tools["http_shop_remove_item"].annotations
        assert (remove.read_only_hint, remove.destructive_hint) == (False, True)
        assert tools["http_shop_add_item"].input_schema["required"] == ["item"]
        reply = await call(ws, 2, "tool_request", tool="http_shop_list_items", args={})
        assert reply["result"]["data"] == {"data": [{"item": "tea"}]}
        assert sent[0].headers["authorization"] == "Bearer tok-0123456789"
        reply = await call(ws, 3, "tool_request", tool="http_shop_nope", args={})
        assert reply["error"]["code"] == -32602


# --- the command line --------------------------------------------------------------------------


def write_config(tmp_path: Path, tools: Path, policy: str = POLICY) -> Path:
    (tmp_path / "permissions.yaml").write_text(policy)
    path = tmp_path / "gate.toml"
    path.write_text(
        '[gateway]\nlisten = "127.0.0.1:0"\n[store]\npath = "db/a.db"\n'
        '[agents.pi]\ntoken = "pi-token-0123456789abcdef"\n' + gate_extra(tools)
    )
    return path


def test_config_check_checks_tools_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, EXAMPLE)
    assert main(["config", "check", str(path), "--insecure", "--no-bind"]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 agent")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "tools:\n  - name: x\n    description: y\n    method: GET\n    path: /a\n    extra: 1\n"
    )
    path = write_config(tmp_path, bad)
    assert main(["config", "check", str(path), "--insecure", "--no-bind"]) == 2
    err = capsys.readouterr().err
    assert 'bad.yaml: tools[0]: unknown key "extra"' in err


def test_config_check_knows_http_tools_in_policies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = POLICY + '  - {pattern: "http_shop_add_itme(*)", action: deny}\n'
    path = write_config(tmp_path, EXAMPLE, typo)
    assert main(["config", "check", str(path), "--insecure", "--no-bind"]) == 2
    assert "no known tool is called 'http_shop_add_itme' (did you mean" in capsys.readouterr().err


def test_check_with_config_signs_http_tools(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, EXAMPLE)
    code = main(["check", "--config", str(path), "--json", "http_shop_add_item", "item=milk"])
    assert code == 3
    out = json.loads(capsys.readouterr().out)
    assert out["signature"] == "http_shop_add_item(item=milk)"
    assert out["matched"] == "rule 1: http_shop_add_item(*) (ask)"


def test_http_service_table_is_checked(tmp_path: Path) -> None:
    path = write_config(tmp_path, EXAMPLE)
    text = path.read_text().replace('auth = "bearer"', 'auth = "basic"')
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, insecure=True)
    lines = str(info.value)
    assert 'services.http.shop.username: required with auth = "basic"' in lines
    assert 'services.http.shop.token: not used with auth = "basic": remove it' in lines
    assert "tok-0123456789" not in lines
