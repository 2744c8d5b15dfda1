"""deploy/envoy/envoy.yaml is documented, not run (no Envoy here): this parses it and checks that it hashes the
header the clients send, on a ring, with gRPC health checks and retries on UNAVAILABLE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stepscore.runtime.client import SEARCH_ID_HEADER

yaml: Any = pytest.importorskip("yaml", reason="PyYAML parses the config (installed with the export project)")

CONF = Path(__file__).resolve().parents[2] / "deploy/envoy/envoy.yaml"


def test_envoy_routes_by_the_search_header_on_a_ring() -> None:
    config = yaml.safe_load(CONF.read_text())["static_resources"]
    (cluster,) = config["clusters"]
    assert cluster["lb_policy"] == "RING_HASH" and cluster["health_checks"][0]["grpc_health_check"] == {}
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint == {"address": "stepscore-headless", "port_value": 50051}  # deploy/kubernetes/service.yaml
    (listener,) = config["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == cluster["name"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": SEARCH_ID_HEADER}}]
    assert "unavailable" in route["route"]["retry_policy"]["retry_on"].split(",")
    assert route["route"]["timeout"] == "0s"  # streams are not cut
