"""agentgate's benchmark harness (``python -m bench``) and soak test (``python -m bench.soak``).

Every figure is taken on 127.0.0.1 with real processes: the fast fake Home Assistant
(:mod:`bench.fasthome`), the gateway (``python -m agentgate serve``), the floors' echo server
(:mod:`bench.door`) and the load generators (:mod:`bench.load`: the SDK, or for floors a bare
``httpx.AsyncClient`` or trio-websocket client) each run in their own process. See
``bench/README.md`` and ``docs/performance.md``.
"""
