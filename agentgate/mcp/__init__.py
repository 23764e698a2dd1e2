"""The MCP front door: agentgate as a Model Context Protocol server, over two transports.

::

    MCP client ──stdio──▶ agentgate mcp (the bridge, on the agent's device) ──WSS──▶ gateway
    MCP client ──Streamable HTTP (TLS, bearer = agent token)──────────────────────▶ gateway

Both transports serve one behaviour (:mod:`agentgate.mcp.server`): the gateway's tools with
their JSON Schemas, agentgate's own ``agentgate_result`` and ``agentgate_pending_results``,
and every outcome as a tool result a model can act on. What differs is the backend a call
goes to: the HTTP door (:mod:`agentgate.mcp.http`) hands it to the gateway's pipeline
directly; the bridge (:mod:`agentgate.mcp.stdio`) forwards it over WSS with the agent SDK.
Nothing here decides: the pipeline does, once for every door.

Runs on Trio: the official ``mcp`` SDK is anyio-based, and its Streamable HTTP app is served
by Hypercorn's Trio worker inside the gateway's root nursery (no second event loop).

Imports: nothing itself. Its modules: the HTTP door reaches the pipeline (and approvals, config,
limits, protocol, errors), the bridge the SDK (client, cli, cli_agent), both mcp.server.
"""
