"""agentgate's benchmark harness (``python -m bench``) and soak test (``python -m bench.soak``).

Every figure is taken on 127.0.0.1 with real processes: the fake Home Assistant
(``agentgate.testing.fake_homeassistant``), the gateway (``python -m agentgate serve``) and the
load generators (:mod:`bench.load`, the SDK or a bare ``httpx.AsyncClient``) each run in their
own process. See ``bench/README.md`` and ``docs/performance.md``.
"""
