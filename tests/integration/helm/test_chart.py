"""The Helm chart (deploy/helm/portal-sync): `helm lint`, and `helm template` with the
default values and with values-production.yaml validated against the Kubernetes schemas
(kubernetes-validate, offline, strict: unknown fields fail). The Prometheus Operator's
ServiceMonitor and PrometheusRule have no schema there: they are checked against the
subset of monitoring.coreos.com/v1 the chart writes (below), their metadata against
Kubernetes' ObjectMeta, and the PrometheusRule's rules must equal
deploy/prometheus/alerts.yml. Also: the chart's copies of deploy files are current, and
what the chart refuses to render.

Helm is built by `deploy/install-system.sh --postgres` (`go install` of v3.22.0, cached in
~/.cache/portal-sync/bin): a missing or different Helm fails these tests, never skips them."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from producers.deployment import load_deployment
from transport.local import REPO_ROOT

CHART = REPO_ROOT / "deploy" / "helm" / "portal-sync"
PRODUCTION = CHART / "values-production.yaml"
HELM_VERSION = "v3.22.0"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate bundles.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
NAMESPACE = "portal-sync"
RELEASE = "ps"
FULLNAME = "ps-portal-sync"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

Manifest = dict[str, Any]


def helm_path() -> Path:
    configured = os.environ.get("PORTAL_SYNC_HELM")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "portal-sync" / "bin" / "helm"


@pytest.fixture(scope="session")
def helm(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = helm_path()
    if not os.access(binary, os.X_OK):
        pytest.fail(
            f"helm is missing at {binary}: `bash deploy/install-system.sh --postgres` builds it"
        )
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), *args], capture_output=True, text=True, env=env, timeout=120
        )

    version = run("version", "--template", "{{.Version}}")
    if version.returncode != 0 or version.stdout.strip() != HELM_VERSION:
        pytest.fail(
            f"{binary} is not Helm {HELM_VERSION} ({version.stdout.strip() or version.stderr}): "
            "`bash deploy/install-system.sh --postgres` rebuilds it"
        )
    return run


def template(
    helm: Callable[..., subprocess.CompletedProcess[str]],
    *args: str,
    kube_version: str = KUBE_VERSIONS[-1],
) -> subprocess.CompletedProcess[str]:
    return helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "--kube-version", kube_version, *args,
    )  # fmt: skip


def render(
    helm: Callable[..., subprocess.CompletedProcess[str]],
    *args: str,
    kube_version: str = KUBE_VERSIONS[-1],
) -> list[Manifest]:
    result = template(helm, *args, kube_version=kube_version)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


VALUES = {"default": (), "production": ("-f", str(PRODUCTION))}


@pytest.fixture(scope="module")
def default(helm: Callable[..., subprocess.CompletedProcess[str]]) -> list[Manifest]:
    return render(helm)


@pytest.fixture(scope="module")
def production(helm: Callable[..., subprocess.CompletedProcess[str]]) -> list[Manifest]:
    return render(helm, *VALUES["production"])


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def container(deployment: Manifest) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env_of(deployment: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


# --- lint and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("values", sorted(VALUES))
def test_helm_lint_passes_strict(
    helm: Callable[..., subprocess.CompletedProcess[str]], values: str
) -> None:
    result = helm("lint", "--strict", str(CHART), *VALUES[values])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


# The subset of monitoring.coreos.com/v1 that the chart writes (prometheus-operator's CRDs);
# unknown fields fail, as they would in the API server's structural schema.
SECRET_KEY = {
    "type": "object",
    "required": ["name", "key"],
    "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                   "optional": {"type": "boolean"}},
    "additionalProperties": False,
}  # fmt: skip
SECRET_OR_CONFIGMAP = {
    "type": "object",
    "properties": {"secret": SECRET_KEY, "configMap": SECRET_KEY},
    "additionalProperties": False,
}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
            r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}  # fmt: skip
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SPEC = {
    "type": "object",
    "required": ["selector", "endpoints"],
    "additionalProperties": False,
    "properties": {
        "jobLabel": {"type": "string"},
        "selector": {
            "type": "object",
            "properties": {"matchLabels": STRING_MAP},
            "additionalProperties": False,
        },
        "namespaceSelector": {
            "type": "object",
            "properties": {
                "matchNames": {"type": "array", "items": {"type": "string"}},
                "any": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["port"],
                "additionalProperties": False,
                "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string"},
                    "scheme": {"enum": ["http", "https"]},
                    "interval": DURATION,
                    "scrapeTimeout": DURATION,
                    "tlsConfig": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "ca": SECRET_OR_CONFIGMAP,
                            "cert": SECRET_OR_CONFIGMAP,
                            "keySecret": SECRET_KEY,
                            "serverName": {"type": "string"},
                            "insecureSkipVerify": {"type": "boolean"},
                        },
                    },
                    "basicAuth": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"username": SECRET_KEY, "password": SECRET_KEY},
                    },
                },
            },
        },
    },
}
PROMETHEUS_RULE_SPEC = {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "rules"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "rules": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["expr"],
                            "additionalProperties": False,
                            "properties": {
                                "alert": {"type": "string", "minLength": 1},
                                "record": {"type": "string", "minLength": 1},
                                "expr": {"type": "string", "minLength": 1},
                                "for": DURATION,
                                "labels": STRING_MAP,
                                "annotations": STRING_MAP,
                            },
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        },
                    },
                },
            },
        },
    },
}
CRD_SPECS = {"ServiceMonitor": SERVICE_MONITOR_SPEC, "PrometheusRule": PROMETHEUS_RULE_SPEC}


def validate(manifest: Manifest, kube_version: str) -> None:
    kind = manifest["kind"]
    if kind in CRD_KINDS:
        assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
        # The metadata against Kubernetes' own ObjectMeta (through a ConfigMap's schema).
        carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]}
        kubernetes_validate.validate(carrier, kube_version, strict=True)
        jsonschema.Draft202012Validator(CRD_SPECS[kind]).validate(manifest["spec"])
        return
    kubernetes_validate.validate(manifest, kube_version, strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", sorted(VALUES))
def test_rendered_manifests_validate_against_the_kubernetes_schemas(
    helm: Callable[..., subprocess.CompletedProcess[str]], values: str, kube_version: str
) -> None:
    manifests = render(helm, *VALUES[values], kube_version=kube_version)
    kinds = {m["kind"] for m in manifests}
    expected = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "Job"}
    if values == "production":
        expected |= {"ServiceMonitor", "PrometheusRule", "PersistentVolumeClaim", "NetworkPolicy"}
    assert kinds == expected
    for manifest in manifests:
        try:
            validate(manifest, kube_version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
            pytest.fail(f"{manifest['kind']} {manifest['metadata']['name']}: {error}")


def test_the_structural_checks_of_the_crds_catch_mistakes(production: list[Manifest]) -> None:
    monitor = one(production, "ServiceMonitor", FULLNAME)
    broken = {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, KUBE_VERSIONS[-1])
    rule = one(production, "PrometheusRule", FULLNAME)
    group = rule["spec"]["groups"][0]
    bad_rule = {**group["rules"][0], "for": "ten minutes"}
    broken = {**rule, "spec": {"groups": [{**group, "rules": [bad_rule]}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, KUBE_VERSIONS[-1])


# --- the chart's copies of deploy files ---------------------------------------------------


def sync_files() -> ModuleType:
    path = REPO_ROOT / "deploy" / "helm" / "sync_files.py"
    spec = importlib.util.spec_from_file_location("sync_files", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_charts_copies_of_deploy_files_are_current() -> None:
    assert sync_files().stale() == [], "stale: run `python deploy/helm/sync_files.py`"


def test_the_prometheus_rule_has_exactly_the_rules_of_alerts_yml(
    production: list[Manifest],
) -> None:
    rule = one(production, "PrometheusRule", FULLNAME)
    alerts = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    names = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert "PortalSyncWorkerStalled" in names and len(names) == len(set(names))


def test_the_prometheus_rule_links_its_runbooks_where_the_repository_is_served(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    base = "https://git.example.gov.vn/portal-sync/blob/main/"
    served = render(helm, *VALUES["production"], "--set", f"prometheusRule.runbookBase={base}")
    rules = [r for g in one(served, "PrometheusRule", FULLNAME)["spec"]["groups"]
             for r in g["rules"]]  # fmt: skip
    urls = {r["alert"]: r["annotations"]["runbook_url"] for r in rules}
    stalled = "PortalSyncWorkerStalled"
    assert urls[stalled] == f"{base}docs/metrics.md#runbook-{stalled.lower()}"
    assert all(url.startswith(base + "docs/metrics.md#runbook-") for url in urls.values())


def test_another_freshness_objective_is_refused_with_the_shipped_rules(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """The rules compare with the 60 s bucket: another objective in `env` made the alert
    measure against 60 s, silently. Refused while the chart's PrometheusRule is on."""
    objective = ("--set", "env.PORTAL_SYNC_FRESHNESS_OBJECTIVE_SECONDS=120")
    refused = template(helm, *VALUES["production"], "--set", "prometheusRule.enabled=true",
                       *objective)  # fmt: skip
    assert refused.returncode != 0 and "--objective 120" in refused.stderr, refused.stderr
    render(helm, *VALUES["production"], "--set", "prometheusRule.enabled=false", *objective)
    same = ("--set", "env.PORTAL_SYNC_FRESHNESS_OBJECTIVE_SECONDS=60")
    render(helm, *VALUES["production"], "--set", "prometheusRule.enabled=true", *same)
    # the worker's own env wins (the worker is the process that reads it)
    worker = ("--set", "worker.env.PORTAL_SYNC_FRESHNESS_OBJECTIVE_SECONDS=120")
    refused = template(helm, *VALUES["production"], "--set", "prometheusRule.enabled=true",
                       *same, *worker)  # fmt: skip
    assert refused.returncode != 0 and "--objective 120" in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    ("settings", "dropped"),
    [
        ((), set()),  # the production values deploy a lag exporter and a producer
        (("--set", "lagExporter.enabled=false"), {"PortalSyncLagExporterMissing"}),
        (("--set", "producers=null"), {"PortalSyncProducerMissing"}),
    ],
    ids=["both", "no lag exporter", "no producer"],
)
def test_the_absence_of_what_the_chart_does_not_deploy_is_no_alert(
    helm: Callable[..., subprocess.CompletedProcess[str]],
    settings: tuple[str, ...],
    dropped: set[str],
) -> None:
    """`absent(up{job=…})` fires for ever where no such target is deployed: the chart
    leaves the lag exporter's and the producers' rule out then, and only that one."""
    manifests = render(helm, *VALUES["production"], *settings)
    rule = one(manifests, "PrometheusRule", FULLNAME)
    names = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    alerts = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    every = [r["alert"] for g in alerts["groups"] for r in g["rules"]]
    assert {"PortalSyncLagExporterMissing", "PortalSyncProducerMissing"} <= set(every)
    assert names == [name for name in every if name not in dropped]
    exporter = [m for m in manifests if m["metadata"]["name"] == f"{FULLNAME}-lag-exporter"]
    assert bool(exporter) == ("PortalSyncLagExporterMissing" not in dropped)


def test_the_dashboard_configmap_is_the_dashboard_for_the_grafana_sidecar(
    default: list[Manifest],
) -> None:
    board = one(default, "ConfigMap", f"{FULLNAME}-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    original = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "portal-sync.json"
    assert board["data"]["portal-sync.json"] == original.read_text(encoding="utf-8")


def test_the_rules_default_to_the_repositorys_files_and_take_yours(
    helm: Callable[..., subprocess.CompletedProcess[str]], default: list[Manifest], tmp_path: Path
) -> None:
    rules = one(default, "ConfigMap", f"{FULLNAME}-rules")["data"]
    assert rules["registry.toml"] == (REPO_ROOT / "deploy" / "registry.toml").read_text()
    assert rules["authority.toml"] == (REPO_ROOT / "deploy" / "authority.toml").read_text()
    registry = tmp_path / "registry.toml"
    registry.write_text('[sources.province-01]\nkind = "province"\nname = "Hà Nội"\n')
    manifests = render(helm, "--set-file", f"rules.registry={registry}")
    ours = one(manifests, "ConfigMap", f"{FULLNAME}-rules")["data"]["registry.toml"]
    assert ours == registry.read_text()
    hook = one(manifests, "ConfigMap", f"{FULLNAME}-store-upgrade-rules")["data"]
    assert hook["registry.toml"] == ours
    before = one(default, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["metadata"]
    after = one(manifests, "Deployment", f"{FULLNAME}-worker")["spec"]["template"]["metadata"]
    assert before["annotations"]["checksum/rules"] != after["annotations"]["checksum/rules"]


# --- the components -----------------------------------------------------------------------


def test_the_workers(production: list[Manifest]) -> None:
    worker = one(production, "Deployment", f"{FULLNAME}-worker")
    assert worker["spec"]["replicas"] == 3
    pod = worker["spec"]["template"]["spec"]
    main = container(worker)
    assert main["args"] == ["worker"]
    assert main["ports"] == [{"name": "metrics", "containerPort": 9310, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert main["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"  # the web config is on
    assert main["resources"]["requests"] and main["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = env_of(worker)
    assert env["PORTAL_SYNC_METRICS_PORT"] == "9310"
    assert env["PORTAL_SYNC_VALIDATOR_PROCESSES"] == "1"  # from the CPU limit, not the node
    assert env["PORTAL_SYNC_METRICS_HOST"] == "0.0.0.0"
    assert env["PORTAL_SYNC_CHANGE_PARTITIONS"] == "12"
    assert env["PORTAL_SYNC_REPLICATION_FACTOR"] == "3"
    assert env["PORTAL_SYNC_REGISTRY"] == "/etc/portal-sync/rules/registry.toml"
    assert env["PORTAL_SYNC_AUTHORITY_FILE"] == "/etc/portal-sync/rules/authority.toml"
    assert env["PORTAL_SYNC_STORE_URL_FILE"] == "/etc/portal-sync/store/url"
    assert env["PORTAL_SYNC_REFERENCE_KEY_FILE"].startswith("/etc/portal-sync/reference/")
    assert env["PORTAL_SYNC_METRICS_WEB_CONFIG_FILE"].startswith("/etc/portal-sync/web/")
    for path in ("/etc/portal-sync/rules", "/etc/portal-sync/store", "/etc/portal-sync/web"):
        assert path in mounts
    budget = one(production, "PodDisruptionBudget", f"{FULLNAME}-worker")
    assert budget["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] == 1


def test_kafka_over_sasl_ssl_from_secrets(production: list[Manifest]) -> None:
    env = env_of(one(production, "Deployment", f"{FULLNAME}-worker"))
    assert env["PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["PORTAL_SYNC_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert len(env["PORTAL_SYNC_KAFKA_BOOTSTRAP"].split(",")) == 3
    assert env["PORTAL_SYNC_KAFKA_SASL_USERNAME"]["secretKeyRef"]["name"]
    assert env["PORTAL_SYNC_KAFKA_SASL_PASSWORD_FILE"] == "/etc/portal-sync/kafka-sasl/password"
    assert env["PORTAL_SYNC_KAFKA_SSL_CAFILE"] == "/etc/portal-sync/kafka-tls/ca.crt"
    assert "PORTAL_SYNC_KAFKA_SASL_PASSWORD" not in env  # a file, never an env value


def test_the_lag_exporter(production: list[Manifest]) -> None:
    exporter = one(production, "Deployment", f"{FULLNAME}-lag-exporter")
    main = container(exporter)
    assert main["args"][0] == "lag-exporter"
    assert main["ports"][0]["containerPort"] == 9311
    assert env_of(exporter)["PORTAL_SYNC_LAG_EXPORTER_PORT"] == "9311"
    service = one(production, "Service", f"{FULLNAME}-lag-exporter")
    assert service["spec"]["ports"][0]["port"] == 9311
    # Only the reconciler's group: the alerts page for every group exported, and an
    # abandoned one (an old group id) would be STOP for ever.
    group = yaml.safe_load(PRODUCTION.read_text()).get("kafka", {}).get("groupId")
    group = group or "portal-sync-reconciler"
    (pattern,) = [a.removeprefix("--group=") for a in main["args"] if a.startswith("--group=")]
    assert re.fullmatch(pattern, group) and not re.fullmatch(pattern, f"{group}-old")


def test_the_lag_exporter_watches_the_groups_asked(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    wider = render(helm, *VALUES["production"], "--set", "lagExporter.groups=portal-sync-.*")
    main = container(one(wider, "Deployment", f"{FULLNAME}-lag-exporter"))
    assert "--group=portal-sync-.*" in main["args"]
    # quoted: a pattern YAML reads otherwise ('a #b' cut at the '#', 'x-(a|b): y' a map)
    for pattern in ("a #b", "x-(a|b): y"):
        odd = render(helm, *VALUES["production"], "--set-string", f"lagExporter.groups={pattern}")
        assert (
            f"--group={pattern}"
            in container(one(odd, "Deployment", f"{FULLNAME}-lag-exporter"))["args"]
        )


def test_one_producer_per_deployment_file(production: list[Manifest]) -> None:
    values = yaml.safe_load(PRODUCTION.read_text())
    for producer in values["producers"]:
        name = f"{FULLNAME}-producer-{producer['name']}"
        file = one(production, "ConfigMap", name)["data"]["deployment.toml"]
        assert file == producer["config"]
        deployment = one(production, "Deployment", name)
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        # Its stop saves the acknowledged checkpoints, a flush waiting up to 60 s.
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
        main = container(deployment)
        assert main["args"] == [
            "produce", "--config=/etc/portal-sync/producer/deployment.toml",
            "--metrics-host=0.0.0.0", "--metrics-port=9312",
            "--state-dir=/var/lib/portal-sync/state",
            "--signing-key-file=/etc/portal-sync/signing/signing.key",
        ]  # fmt: skip
        assert main["ports"][0]["containerPort"] == 9312
        env = env_of(deployment)
        for var, ref in producer.get("secretEnv", {}).items():
            assert env[var] == {"secretKeyRef": {"name": ref["secretName"], "key": ref["key"]}}
        # The source's password as a read-only file, never in the environment.
        secret_files = deployment["spec"]["template"]["spec"]["volumes"]
        projected = next(v for v in secret_files if v["name"] == "secret-files")["projected"]
        assert projected["defaultMode"] == 0o440
        assert projected["sources"] == [
            {"secret": {"name": ref["secretName"], "items": [{"key": ref["key"], "path": name}]}}
            for name, ref in producer["secretFiles"].items()
        ]
        assert all(not var.endswith("PASSWORD") or var.startswith("PORTAL_SYNC_") for var in env)
        assert "PORTAL_SYNC_STORE_URL_FILE" not in env  # producers never get the store
        # Its own Kafka user and signing key, never the workers'.
        own_user = producer["kafkaSasl"]["existingSecret"]
        assert env["PORTAL_SYNC_KAFKA_SASL_USERNAME"]["secretKeyRef"]["name"] == own_user
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["kafka-sasl"]["secret"]["secretName"] == own_user
        signing = volumes["signing-key"]["secret"]
        assert signing["secretName"] == producer["signingKey"]["existingSecret"]
        assert signing["items"] == [{"key": "signing.key", "path": "signing.key"}]
        mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
        assert mounts["signing-key"] == "/etc/portal-sync/signing"
        claim = deployment["spec"]["template"]["spec"]["volumes"]
        state = next(v for v in claim if v["name"] == "state")
        assert state["persistentVolumeClaim"]["claimName"] == f"{name}-state"
        one(production, "PersistentVolumeClaim", f"{name}-state")
        assert one(production, "Service", name)["spec"]["ports"][0]["port"] == 9312


def test_the_producers_example_files_are_valid_deployment_files(tmp_path: Path) -> None:
    values = yaml.safe_load(PRODUCTION.read_text())
    for producer in values["producers"]:
        path = tmp_path / f"{producer['name']}.toml"
        secrets = tmp_path / "secrets"
        secrets.mkdir(exist_ok=True)
        for name in producer.get("secretFiles", {}):
            (secrets / name).write_text("p@ss/word\n")
        path.write_text(producer["config"].replace("/etc/portal-sync/secrets/", f"{secrets}/"))
        environ = dict.fromkeys(producer.get("secretEnv", {}), "secret")
        deployment = load_deployment(path, environ)
        assert deployment.sources
        # verify-full without `sslrootcert` looks for the CA in $HOME/.postgresql, which a
        # producer's pod has not: every poll failed. A CA file must be mounted in the pod.
        for source in deployment.sources:
            url = str(source.connection.get("url", ""))
            if "sslmode=verify-full" in url:
                root = url.split("sslrootcert=")[1].split("&")[0]
                mounts = [m["mountPath"] for m in producer.get("extraVolumeMounts", [])]
                assert root == "system" or any(root.startswith(m + "/") for m in mounts), url


def test_the_service_monitor_scrapes_every_process_under_the_documented_jobs(
    production: list[Manifest],
) -> None:
    monitor = one(production, "ServiceMonitor", FULLNAME)
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in production
        if s["kind"] == "Service" and selector.items() <= s["metadata"]["labels"].items()
    ]  # fmt: skip
    jobs = {s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in services}
    scrape = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert jobs == {job["job_name"] for job in scrape["scrape_configs"]}
    assert len(services) == 4  # worker, lag exporter, two producers
    for service in services:
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["ports"][0]["name"] == "metrics"
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["scheme"] == "https"
    assert endpoint["basicAuth"]["password"]["name"]


def test_the_store_upgrade_hook_runs_before_install_and_upgrade(default: list[Manifest]) -> None:
    job = one(default, "Job", f"{FULLNAME}-store-upgrade")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["args"] == ["store", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    env = env_of(job)
    assert env["PORTAL_SYNC_STORE_URL_FILE"] == "/etc/portal-sync/store/url"
    rules = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "rules")
    hook_rules = one(default, "ConfigMap", rules["configMap"]["name"])
    annotations = hook_rules["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(annotations["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )


def test_with_an_owner_the_store_upgrade_upgrades_as_the_owner_and_grants_the_workers_role(
    helm: Callable[..., subprocess.CompletedProcess[str]], default: list[Manifest]
) -> None:
    owner = ("--set", "storeUpgrade.owner.existingSecret=portal-sync-store-owner",
             "--set", "storeUpgrade.owner.runtimeRole=portal_sync")  # fmt: skip
    job = one(render(helm, *owner), "Job", f"{FULLNAME}-store-upgrade")
    spec = job["spec"]["template"]["spec"]
    assert [c["args"] for c in spec["initContainers"]] == [["store", "upgrade"]]
    assert container(job)["args"] == ["store", "grant", "portal_sync"]
    store = next(v for v in spec["volumes"] if v["name"] == "store")["secret"]
    assert store["secretName"] == "portal-sync-store-owner"
    for step in (*spec["initContainers"], container(job)):
        env = {e["name"]: e.get("value") for e in step["env"]}
        assert env["PORTAL_SYNC_STORE_URL_FILE"] == "/etc/portal-sync/store/url"
    # The workers keep the store's own credential.
    worker = one(render(helm, *owner), "Deployment", f"{FULLNAME}-worker")
    volumes = worker["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "store")["secret"]["secretName"] == (
        "portal-sync-store"
    )
    default_job = one(default, "Job", f"{FULLNAME}-store-upgrade")
    assert "initContainers" not in default_job["spec"]["template"]["spec"]
    # an empty env: (YAML null) renders, with the PrometheusRule too
    render(helm, *owner, "--set", "worker.env=null", "--set", "env=null")
    render(helm, *VALUES["production"], "--set", "worker.env=null", "--set", "env=null")
    # the pod's labels and annotations of every pod (a NetworkPolicy's, a mesh's opt-out:
    # without them the hook could not reach the database, or never completed)
    pod = one(render(helm, *owner, "--set-string", "podLabels.netpol/allow-postgres=true",
                     "--set-string", "podAnnotations.sidecar\\.istio\\.io/inject=false"),
              "Job", f"{FULLNAME}-store-upgrade")["spec"]["template"]["metadata"]  # fmt: skip
    assert pod["labels"]["netpol/allow-postgres"] == "true"
    assert pod["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pod["annotations"]["kubectl.kubernetes.io/default-container"] == "store-upgrade"
    # Neither the workers' Kafka identity nor the metrics' TLS key: the store's commands
    # use neither, and the pod holding the owner's URL holds no more.
    job = one(render(helm, *VALUES["production"]), "Job", f"{FULLNAME}-store-upgrade")
    spec = job["spec"]["template"]["spec"]
    assert {v["name"] for v in spec["volumes"]} == {
        "tmp", "store", "store-tls", "reference-key", "rules"}  # fmt: skip
    for each in [*spec.get("initContainers", []), *spec["containers"]]:
        names = {e["name"] for e in each["env"]}
        assert not {n for n in names if "SASL" in n or "SSL" in n or "WEB_CONFIG" in n}, names
    # the floor follows the workers' retention of the access log, where it is set
    retention = "PORTAL_SYNC_ACCESS_LOG_RETENTION_DAYS"
    for where in ("worker.env", "env"):
        job = one(render(helm, *owner, "--set-string", f"{where}.{retention}=365"), "Job",
                  f"{FULLNAME}-store-upgrade")  # fmt: skip
        assert container(job)["args"] == [
            "store", "grant", "portal_sync", "--access-log-floor-days", "365"]  # fmt: skip


def test_a_province_installs_its_producers_only(
    helm: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """worker.enabled=false: no worker, no store needed, no alert of a missing worker (it
    fired for ever under a producers-only release, which the chart could not render
    without a store Secret and rendered a worker of 0 replicas with)."""
    producer = {"name": "hcm", "config": (
        '[[sources]]\nid = "hcm-citizens"\nsource = "province-79"\nadapter = "filedrop"\n'
        '[sources.connection]\ndirectory = "/data/drop"\n[sources.mapping]\n'
        'entity = "citizen"\nkey_field = "pid"\noccurred_at_field = "at"\n')}  # fmt: skip
    values = tmp_path / "province.yaml"
    values.write_text(yaml.safe_dump({
        "worker": {"enabled": False}, "lagExporter": {"enabled": False},
        "storeUpgrade": {"enabled": False}, "store": {"existingSecret": ""},
        "prometheusRule": {"enabled": True}, "producers": [producer],
    }))  # fmt: skip
    manifests = render(helm, "-f", str(values))
    assert not [m for m in manifests if "worker" in m["metadata"]["name"]]
    assert one(manifests, "Deployment", f"{FULLNAME}-producer-hcm")
    rules = one(manifests, "PrometheusRule", FULLNAME)["spec"]["groups"]
    names = {rule["alert"] for group in rules for rule in group["rules"]}
    assert "PortalSyncWorkerMissing" not in names and "PortalSyncProducerMissing" in names
    # a part of the release that reads the store still needs its Secret
    refused = template(helm, "-f", str(values), "--set", "toolbox.enabled=true")
    assert refused.returncode != 0 and "store.existingSecret is required" in refused.stderr


def test_defaults_leave_the_operator_resources_off(default: list[Manifest]) -> None:
    kinds = {m["kind"] for m in default}
    assert not kinds & CRD_KINDS
    worker = one(default, "Deployment", f"{FULLNAME}-worker")
    assert worker["spec"]["replicas"] == 1
    assert container(worker)["livenessProbe"]["httpGet"]["scheme"] == "HTTP"
    assert env_of(worker)["PORTAL_SYNC_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
    assert "NetworkPolicy" not in kinds  # it needs to know who scrapes


def pod_templates(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Every pod the release runs (Deployments, Jobs), by its owner's kind and name."""
    return {
        f"{m['kind']} {m['metadata']['name']}": m["spec"]["template"]
        for m in manifests
        if m["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    }


def test_the_network_policy_lets_only_the_scrapers_in_and_only_to_the_metrics_ports(
    production: list[Manifest],
) -> None:
    policy = one(production, "NetworkPolicy", FULLNAME)["spec"]
    pods = pod_templates(production)
    # producers, workers, lag exporter, toolbox and the store upgrade all under it
    assert len(pods) >= 6, sorted(pods)
    selector = policy["podSelector"]["matchLabels"]
    for name, pod in pods.items():
        labels = pod["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    # every port a pod serves is allowed in, and nothing else
    served = {
        (port.get("protocol", "TCP"), port["containerPort"])
        for pod in pods.values()
        for c in pod["spec"]["containers"]
        for port in c.get("ports", [])
    }
    (rule,) = policy["ingress"]
    assert {(port["protocol"], port["port"]) for port in rule["ports"]} == served
    assert rule["from"] == yaml.safe_load(PRODUCTION.read_text())["networkPolicy"]["metricsFrom"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A NetworkPolicy's podSelector (matchLabels, matchExpressions with In) on a pod."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_out_each_pod_reaches_dns_the_brokers_and_only_what_it_uses(
    production: list[Manifest],
) -> None:
    """Policies add up: a pod may go where any policy selecting it lets it. A producer,
    which reads a province's or a ministry's system, reaches neither the national store
    nor another producer's source; the store's users reach the store."""
    values = yaml.safe_load(PRODUCTION.read_text())
    brokers, store = values["networkPolicy"]["egress"], values["networkPolicy"]["storeEgress"]
    sources = {p["name"]: p["egress"] for p in values["producers"]}
    dns = {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    policies = [m["spec"] for m in production if m["kind"] == "NetworkPolicy"]
    assert all("Egress" in policy["policyTypes"] for policy in policies)
    for name, pod in pod_templates(production).items():
        labels = pod["metadata"]["labels"]
        allowed = [
            rule
            for policy in policies
            if _selects(policy["podSelector"], labels)
            for rule in policy.get("egress", [])
        ]
        component = labels["app.kubernetes.io/component"]
        if component == "producer":
            expected = [dns, *brokers, *sources[labels["portal-sync/producer"]]]
        else:
            assert component in ("worker", "lag-exporter", "toolbox", "store-upgrade"), name
            expected = [dns, *brokers, *store]
        assert allowed == expected, name


def test_egress_rules_close_everything_else_but_dns(
    helm: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    brokers = {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}],
        "ports": [{"protocol": "TCP", "port": 9093}],
    }
    values = tmp_path / "np.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "networkPolicy": {
                    "enabled": True,
                    "metricsFrom": [{"namespaceSelector": {}}],
                    "egress": [brokers],
                }
            }
        )
    )
    manifests = render(helm, "-f", str(values))
    policy = one(manifests, "NetworkPolicy", FULLNAME)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    dns, given = policy["egress"]
    assert "to" not in dns and {p["port"] for p in dns["ports"]} == {53}
    assert given == brokers
    for manifest in manifests:
        validate(manifest, KUBE_VERSIONS[-1])


# --- what the chart refuses -------------------------------------------------------------


def producer_values(tmp_path: Path, config: str, **extra: Any) -> str:
    path = tmp_path / "producer.yaml"
    path.write_text(yaml.safe_dump({"producers": [{"name": "p1", "config": config, **extra}]}))
    return str(path)


@pytest.fixture
def values_file(tmp_path: Path) -> Iterator[Callable[..., str]]:
    yield lambda config, **extra: producer_values(tmp_path, config, **extra)


REFUSALS = {
    "more workers than partitions": (
        ("--set", "worker.replicas=7", "--set", "kafka.changePartitions=6"),
        "worker.replicas (7) must not exceed kafka.changePartitions (6)",
    ),
    "SASL without its secret": (
        ("--set", "kafka.securityProtocol=SASL_SSL"),
        "needs kafka.sasl.existingSecret",
    ),
    "TLS files without TLS": (
        (
            *("--set", "kafka.securityProtocol=SASL_PLAINTEXT"),
            *("--set", "kafka.sasl.existingSecret=w"),
            *("--set", "kafka.tls.existingSecret=kafka-tls"),
        ),
        "kafka.tls is for SSL or SASL_SSL",
    ),
    "an unknown security protocol": (
        ("--set", "kafka.securityProtocol=TLS"),
        "kafka.securityProtocol must be",
    ),
    "no store secret": (("--set", "store.existingSecret="), "store.existingSecret is required"),
    "an owner without the role to grant": (
        ("--set", "storeUpgrade.owner.existingSecret=portal-sync-store-owner"),
        "storeUpgrade.owner.runtimeRole is required",
    ),
    "a network policy that names no scraper": (
        ("--set", "networkPolicy.enabled=true"),
        "networkPolicy.metricsFrom is required",
    ),
    "a network policy's scrapers not as a list": (
        (
            *("--set", "networkPolicy.enabled=true"),
            *("--set", "networkPolicy.metricsFrom.namespaceSelector.matchLabels.a=b"),
        ),
        "networkPolicy.metricsFrom must be a list",
    ),
    "a network policy's egress not as a list": (
        (
            *("--set", "networkPolicy.enabled=true"),
            *("--set", "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.a=b"),
            *("--set", "networkPolicy.egress.to=x"),
        ),
        "networkPolicy.egress must be a list",
    ),
    "the store's egress while egress is open": (
        (
            *("--set", "networkPolicy.enabled=true"),
            *("--set", "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.a=b"),
            *("--set", "networkPolicy.storeEgress[0].ports[0].port=5432"),
        ),
        "networkPolicy.storeEgress needs networkPolicy.egress",
    ),
    "a producer's egress while egress is open": (
        (
            *("--set", "networkPolicy.enabled=true"),
            *("--set", "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.a=b"),
            *("--set", "producers[0].name=p1", "--set", "producers[0].config=x"),
            *("--set", "producers[0].egress[0].ports[0].port=5432"),
        ),
        "producers: p1's egress needs networkPolicy.egress",
    ),
    "a role to grant without an owner": (
        ("--set", "storeUpgrade.owner.runtimeRole=portal_sync"),
        "storeUpgrade.owner.runtimeRole needs storeUpgrade.owner.existingSecret",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_the_chart_refuses(
    helm: Callable[..., subprocess.CompletedProcess[str]], case: str
) -> None:
    args, message = REFUSALS[case]
    result = template(helm, *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_an_image_digest_pins_every_container_and_a_wrong_one_is_refused(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """A tag can be pushed again, and nodes with IfNotPresent then run different images
    under one name; a digest cannot."""
    digest = "sha256:" + "ab" * 32
    manifests = render(helm, "--set", f"image.digest={digest}")
    images = {
        c["image"]
        for m in manifests
        if m["kind"] in ("Deployment", "Job", "StatefulSet")
        for c in m["spec"]["template"]["spec"]["containers"]
    }
    assert images == {f"registry.example.gov.vn/portal-sync/portal-sync@{digest}"}
    refused = template(helm, "--set", "image.digest=latest")
    assert refused.returncode != 0 and "must be sha256:" in refused.stderr


def test_the_workers_may_equal_the_partitions(
    helm: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    manifests = render(helm, "--set", "worker.replicas=6", "--set", "kafka.changePartitions=6")
    assert one(manifests, "Deployment", f"{FULLNAME}-worker")["spec"]["replicas"] == 6


def test_a_producer_file_naming_an_unlisted_variable_is_refused(
    helm: Callable[..., subprocess.CompletedProcess[str]], values_file: Callable[..., str]
) -> None:
    config = '[[sources]]\nid = "a"\nadapter = "sql"\n[sources.connection]\nurl = "${DB_URL}"\n'
    result = template(helm, "-f", values_file(config))
    assert result.returncode != 0
    assert "names ${DB_URL}: list it in secretEnv" in result.stderr
    listed = values_file(config, secretEnv={"DB_URL": {"secretName": "db", "key": "url"}})
    assert template(helm, "-f", listed).returncode == 0


def test_a_producer_file_reading_a_secret_file_not_listed_is_refused(
    helm: Callable[..., subprocess.CompletedProcess[str]], values_file: Callable[..., str]
) -> None:
    config = (
        '[[sources]]\nid = "a"\nadapter = "sql"\n[sources.connection]\n'
        'url = "postgresql+psycopg://u:${file:/etc/portal-sync/secrets/db-password}@db/x"\n'
    )
    result = template(helm, "-f", values_file(config))
    assert result.returncode != 0
    assert "list db-password in secretFiles" in result.stderr
    bad = values_file(config, secretFiles={"../db-password": {"secretName": "db", "key": "pw"}})
    assert "must be a plain file name" in template(helm, "-f", bad).stderr
    listed = values_file(config, secretFiles={"db-password": {"secretName": "db", "key": "pw"}})
    manifests = render(helm, "-f", listed)
    deployment = next(
        m for m in manifests if m["kind"] == "Deployment" and "producer" in m["metadata"]["name"]
    )
    mounts = {m["name"]: m for m in container(deployment)["volumeMounts"]}
    assert mounts["secret-files"] == {
        "name": "secret-files",
        "mountPath": "/etc/portal-sync/secrets",
        "readOnly": True,
    }


def test_a_producers_own_kafka_user_needs_a_sasl_protocol(
    helm: Callable[..., subprocess.CompletedProcess[str]], values_file: Callable[..., str]
) -> None:
    """Without SASL the producer would connect with the workers' client certificate."""
    own = values_file("[[sources]]\n", kafkaSasl={"existingSecret": "p1-kafka"})
    result = template(helm, "-f", own, "--set", "kafka.securityProtocol=SSL")
    assert result.returncode != 0
    assert "sets kafkaSasl, but kafka.securityProtocol SSL has no SASL user" in result.stderr


MUTUAL_TLS = (
    "--set", "kafka.securityProtocol=SSL", "--set", "kafka.tls.existingSecret=kafka-tls",
    "--set", "kafka.tls.certKey=tls.crt", "--set", "kafka.tls.keyKey=tls.key",
)  # fmt: skip


def test_a_producer_never_gets_the_workers_kafka_identity(
    helm: Callable[..., subprocess.CompletedProcess[str]], values_file: Callable[..., str]
) -> None:
    """The workers' user or client certificate reads every change topic: a producer pod,
    which parses a province's files and databases, connects as its own source or not at
    all, and is never given the workers' key."""
    bare = values_file("[[sources]]\n")
    sasl = ("--set", "kafka.securityProtocol=SASL_SSL", "--set", "kafka.sasl.existingSecret=w")
    no_user = template(helm, "-f", bare, *sasl)
    assert no_user.returncode != 0
    assert "p1 needs kafkaSasl.existingSecret" in no_user.stderr
    no_certificate = template(helm, "-f", bare, *MUTUAL_TLS)
    assert no_certificate.returncode != 0
    assert "p1 needs kafkaTls.existingSecret" in no_certificate.stderr
    over_sasl = values_file("[[sources]]\n", kafkaSasl={"existingSecret": "p1-kafka"},
                            kafkaTls={"existingSecret": "p1-tls"})  # fmt: skip
    refused = template(helm, "-f", over_sasl, "--set", "kafka.securityProtocol=SASL_PLAINTEXT",
                       "--set", "kafka.sasl.existingSecret=w")  # fmt: skip
    assert refused.returncode != 0 and "sets kafkaTls" in refused.stderr
    # SASL_SSL with client certificates too: its own, beside its own user.
    client_certificates = MUTUAL_TLS[2:]  # kafka.tls's secret, certKey and keyKey
    both = render(helm, "-f", over_sasl, *sasl, *client_certificates)
    env = env_of(one(both, "Deployment", f"{FULLNAME}-producer-p1"))
    assert env["PORTAL_SYNC_KAFKA_SSL_CERTFILE"] == "/etc/portal-sync/kafka-client-tls/client.crt"
    assert env["PORTAL_SYNC_KAFKA_SASL_USERNAME"]["secretKeyRef"]["name"] == "p1-kafka"

    own = values_file("[[sources]]\n", kafkaTls={"existingSecret": "p1-tls"})
    manifests = render(helm, "-f", own, *MUTUAL_TLS)
    producer = one(manifests, "Deployment", f"{FULLNAME}-producer-p1")
    env = env_of(producer)
    assert env["PORTAL_SYNC_KAFKA_SSL_CAFILE"] == "/etc/portal-sync/kafka-tls/ca.crt"
    assert env["PORTAL_SYNC_KAFKA_SSL_CERTFILE"] == "/etc/portal-sync/kafka-client-tls/client.crt"
    assert env["PORTAL_SYNC_KAFKA_SSL_KEYFILE"] == "/etc/portal-sync/kafka-client-tls/client.key"
    volumes = {v["name"]: v["secret"] for v in producer["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}  # fmt: skip
    assert volumes["kafka-tls"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert volumes["kafka-client-tls"]["secretName"] == "p1-tls"
    assert volumes["kafka-client-tls"]["items"] == [
        {"key": "tls.crt", "path": "client.crt"}, {"key": "tls.key", "path": "client.key"},
    ]  # fmt: skip
    mounts = {m["name"]: m["mountPath"] for m in container(producer)["volumeMounts"]}
    assert mounts["kafka-client-tls"] == "/etc/portal-sync/kafka-client-tls"
    # The workers keep theirs.
    worker = env_of(one(manifests, "Deployment", f"{FULLNAME}-worker"))
    assert worker["PORTAL_SYNC_KAFKA_SSL_CERTFILE"] == "/etc/portal-sync/kafka-tls/tls.crt"


def test_the_toolbox_runs_the_operators_commands_as_its_own_principal(
    production: list[Manifest], helm: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """The workers' principal may neither read the dead letters nor write the change
    topics: the runbooks' `dlq` and `offsets` run in the toolbox, as an operator."""
    values = yaml.safe_load(PRODUCTION.read_text())
    toolbox = one(production, "Deployment", f"{FULLNAME}-toolbox")
    main = container(toolbox)
    assert main["command"][:2] == ["python", "-c"]
    idle = main["command"][2]
    assert "signal.SIGTERM" in idle and idle.endswith("signal.pause()")  # ends on SIGTERM
    env = env_of(toolbox)
    own = values["toolbox"]["kafkaSasl"]["existingSecret"]
    assert env["PORTAL_SYNC_KAFKA_SASL_USERNAME"]["secretKeyRef"]["name"] == own
    volumes = {v["name"]: v for v in toolbox["spec"]["template"]["spec"]["volumes"]}
    assert volumes["kafka-sasl"]["secret"]["secretName"] == own
    assert env["PORTAL_SYNC_STORE_URL_FILE"] == "/etc/portal-sync/store/url"
    assert env["PORTAL_SYNC_REGISTRY"] == "/etc/portal-sync/rules/registry.toml"
    mounts = {m["name"] for m in main["volumeMounts"]}
    assert {"store", "rules", "kafka-sasl"} <= mounts
    # Without an operator user of its own it is refused, not given the workers'.
    refused = template(helm, *VALUES["production"], "--set", "toolbox.kafkaSasl.existingSecret=")
    assert refused.returncode != 0 and "toolbox.kafkaSasl.existingSecret" in refused.stderr
    # Off by default.
    assert not [m for m in render(helm) if m["metadata"]["name"].endswith("-toolbox")]


@pytest.mark.parametrize("name", ["Province_79", "-p", "a" * 60])
def test_a_producer_name_that_is_no_short_dns_label_is_refused(
    helm: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, name: str
) -> None:
    path = tmp_path / "producer.yaml"
    path.write_text(yaml.safe_dump({"producers": [{"name": name, "config": "[[sources]]\n"}]}))
    result = template(helm, "-f", str(path))
    assert result.returncode != 0
    assert "producers:" in result.stderr


# --- docs/deploy.md -------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_deploy_docs_links_and_paths_resolve() -> None:
    docs = REPO_ROOT / "docs"
    text = (docs / "deploy.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+\.md)(?:#([^)\s]+))?\)", text)
    assert links
    for target, anchor in links:
        path = docs / target
        assert path.is_file(), target
        if anchor:
            headings = re.findall(r"(?m)^#+ (.+)$", path.read_text(encoding="utf-8"))
            assert anchor in {github_anchor(h) for h in headings}, f"{target}#{anchor}"
    for path in set(re.findall(r"`((?:deploy|bench|tests)/[\w./-]+)", text)):
        assert (REPO_ROOT / path.rstrip("/")).exists(), path
    assert "[docs/deploy.md](docs/deploy.md)" in (REPO_ROOT / "README.md").read_text()
