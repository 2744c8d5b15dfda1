"""deploy/kubernetes/: the manifests parse, and their ports, probes, flags and drain timing agree with each
other and with `stepscore serve` (its flags and their environment variables, its metrics)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from stepscore.cli import build_parser
from stepscore.runtime.flags import env_name

yaml: Any = pytest.importorskip("yaml", reason="PyYAML parses the manifests (installed with the export project)")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy/kubernetes"


def _docs() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _serve_env_names() -> set[str]:
    """The environment variable of every `stepscore serve` option (and of its BUNDLE argument)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    names = {env_name(opt) for action in serve._actions for opt in action.option_strings if opt.startswith("--")}
    return names | {"STEPSCORE_BUNDLE"}


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict[str, Any]]:
    return _docs()


def test_every_manifest_is_there(docs: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(docs) == {
        ("ConfigMap", "stepscore-flags"),
        ("Deployment", "stepscore"),
        ("Service", "stepscore-headless"),
        ("Service", "stepscore"),
        ("HorizontalPodAutoscaler", "stepscore"),
    }


def test_flags_ports_probes_and_drain_agree(docs: dict[tuple[str, str], dict[str, Any]]) -> None:
    flags: dict[str, str] = docs[("ConfigMap", "stepscore-flags")]["data"]
    deployment = docs[("Deployment", "stepscore")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    # every variable is one `stepscore serve` reads (a typo would be silently ignored by the server)
    known = _serve_env_names()
    assert set(flags) <= known, set(flags) - known
    assert set(env) <= known, set(env) - known
    assert (
        "STEPSCORE_REPLICA_ID" in known and env["STEPSCORE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    )
    assert container["envFrom"] == [{"configMapRef": {"name": "stepscore-flags"}}]
    assert [container["command"][0], *container["args"]] == ["stepscore", "serve"]
    assert flags["STEPSCORE_HOST"] == "0.0.0.0"  # probes come from the kubelet, not from loopback
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(flags["STEPSCORE_PORT"]), "metrics": int(flags["STEPSCORE_METRICS_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe  # native gRPC probe: grpc.health.v1
    # the pod outlives the preStop wait plus the whole drain
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(flags["STEPSCORE_GRACE_SECONDS"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("stepscore-headless", "stepscore"):
        service = docs[("Service", name)]["spec"]
        assert service["selector"].items() <= labels.items(), name
        for port in service["ports"]:
            assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]], (name, port)
    assert docs[("Service", "stepscore-headless")]["spec"]["clusterIP"] == "None"  # headless: DNS lists every pod


def test_the_autoscaler_reads_a_metric_the_server_exports(docs: dict[tuple[str, str], dict[str, Any]]) -> None:
    from stepscore.runtime.service.metrics import Metrics

    hpa = docs[("HorizontalPodAutoscaler", "stepscore")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "stepscore"}
    (metric,) = hpa["metrics"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert metric["pods"]["metric"]["name"] in exported
