"""Direct runs listen on loopback only: with no flags, no service (and no
metrics endpoint) is reachable from another host. The compose file binds
0.0.0.0 inside its private network (checked in test_compose.py)."""

from __future__ import annotations

import pytest

from conveyor_common.server import start_metrics
from llm_worker.config import build_parser as worker_flags
from scheduler.config import build_parser as scheduler_flags
from tool_gateway.config import GatewayConfig
from tool_gateway.config import build_parser as gateway_flags


@pytest.mark.parametrize("flags", [scheduler_flags, worker_flags, gateway_flags])
def test_every_service_listens_on_loopback_by_default(flags):
    assert flags().parse_args([]).host == "127.0.0.1"


def test_the_gateway_config_defaults_to_loopback():
    assert GatewayConfig().host == "127.0.0.1"


def test_metrics_listen_where_the_service_does(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "conveyor_common.server.start_http_server",
        lambda port, addr: seen.update(port=port, addr=addr),
    )
    start_metrics(9999, "127.0.0.1")
    assert seen == {"port": 9999, "addr": "127.0.0.1"}
