"""The compose file's tracing backend: a pinned Jaeger with an OTLP/HTTP receiver the server's OTEL_* variables
point at, its UI published, the image carrying the tracing extra, and those variables accepted by the server's
own tracer set-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from server.tracing import Tracer
from server.tracing.sampling import RootSampler

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def server_env() -> dict[str, str]:
    """The optiserve service's environment with ``${VAR:-default}`` resolved to the defaults."""
    env = services()["optiserve"]["environment"]
    return {key: DEFAULT.sub(lambda m: m.group(2), str(value)) for key, value in env.items()}


def test_jaeger_receives_otlp_from_the_server_and_publishes_its_ui() -> None:
    jaeger = services()["jaeger"]
    image, _, tag = jaeger["image"].rpartition(":")
    assert image.endswith("jaegertracing/jaeger") and tag not in ("", "latest")
    assert "16686:16686" in jaeger["ports"]
    command = " ".join(jaeger["command"])
    endpoint = urlparse(server_env()["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.scheme == "http" and endpoint.hostname == "jaeger"
    assert f"receivers.otlp.protocols.http.endpoint=0.0.0.0:{endpoint.port}" in command
    assert "jaeger" in services()["optiserve"]["depends_on"]


def test_the_images_have_the_tracing_extra() -> None:
    extra = re.search(r"^tracing = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert extra is not None and '"opentelemetry-exporter-otlp-proto-http' in extra.group(1)
    assert 'pip install --no-cache-dir "./[tracing]"' in (ROOT / "Dockerfile").read_text()
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert '"./[${EXTRAS},tracing]"' in gpu  # whichever GPU extra the build picks


def test_the_servers_otel_variables_start_a_ratio_sampled_otlp_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    env = {key: value for key, value in server_env().items() if key.startswith("OTEL_")}
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    tracer = Tracer.from_environment(False)
    try:
        assert tracer.enabled and isinstance(tracer._root_sampler, RootSampler)
        assert tracer._provider.resource.attributes["service.name"] == env["OTEL_SERVICE_NAME"]
    finally:
        tracer.shutdown()
