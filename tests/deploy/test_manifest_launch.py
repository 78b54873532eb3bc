"""Manifest-driven launch: the rendered ``dev`` and ``replicated`` overlays, run as local processes.

``kubectl kustomize deploy/k8s/overlays/dev`` is read with PyYAML and every pod it
describes is started the way the kubelet would start it, as processes on this machine:
etcd, then the cluster-init Job (it must exit 0), then the shard StatefulSet, then the bus.
Every declared container port must accept connections, every startup, liveness and
readiness probe must succeed, and SDK and HTTP traffic must go through the bus to both
shards. This proves the manifests start the real code correctly: the command lines, the
environment, the downward API, the addresses each server listens on, advertises and dials,
and the volumes they write to.

The ``replicated`` overlay runs the same way, with one StatefulSet per shard's replica group
(3 member pods each): the groups elect their primaries through etcd, traffic flows, and
then the process of shard 0's primary pod is killed with SIGKILL. Another member must take
over, and commits through the bus flow again with everything acknowledged before still
there; the killed pod, started again as the kubelet would, rejoins its group.

How a pod becomes local processes
---------------------------------

Pods. StatefulSet replicas are ``<name>-<ordinal>``. A Deployment's pod is
``<name>-local`` (``<name>-local-<i>`` if there are several), and a Job's pod is
``<name>-local``.

Environment, built as the kubelet builds it:

- ``envFrom`` ConfigMaps first, then ``env`` in order.
- A ``value`` has ``$(VAR)`` expanded against what is defined before it, and ``$$`` is an
  escaped ``$``.
- ``configMapKeyRef`` and ``configMapRef`` come from the rendered ConfigMaps.
- ``fieldRef``: ``metadata.name`` is the pod name, ``metadata.namespace`` is
  ``oribus-test``, and ``status.podIP`` is ``127.0.0.1``.
- The image's ``ENV`` (Dockerfile) is underneath, and ``PATH`` is this machine's PATH with
  the venv first.

``$(VAR)`` is then expanded in command and args. A reference to an undefined variable
fails the test: the kubelet would leave it literal.

Executables:

- image ``oribus:*``: its ENTRYPOINT ``oribus`` (Dockerfile), or a manifest ``command`` of
  ``oribus``, runs as ``python -m oribus.cli``; ``/opt/venv/bin/python`` is this venv's
  Python.
- image ``quay.io/coreos/etcd:*``: ``etcd`` or ``/usr/local/bin/etcd`` runs as the local
  ``etcd`` (Debian ``etcd-server``). Without it the test fails; it does not skip.

etcd flags are passed unchanged. If the local etcd 3.4 rejected a flag that the 3.5 image
accepts, etcd would exit and the test would fail with its log. No flag is dropped.

Addresses. Every ``(scheme://)?host:port`` in an env value, an argument or an exec probe is
rewritten to ``127.0.0.1:<local port>``. Each (pod, containerPort) has its own free local
port, and the table maps:

- ``0.0.0.0:P``, ``127.0.0.1:P``, ``localhost:P``, ``[::]:P`` and ``<own pod name>:P``
  → this pod's containerPort P;
- ``<pod>.<svc>[.<ns>[.svc[.cluster.local]]]:P``, for the StatefulSet pods of their
  headless ``serviceName`` → that pod's containerPort P;
- ``<svc>[.<ns>[.svc[.cluster.local]]]:P`` of a headless Service → containerPort P of the
  first pod it selects;
- the same names of a ClusterIP Service → the targetPort of service port P on the first
  pod it selects.

``--port P`` / ``--port=P``, where P is a containerPort of the pod, is rewritten the same
way (this is the form the prod probe script takes). Any other ``host:port`` fails the test:
it would not resolve here, or it would reach something real.

Paths. Each volumeMount's ``mountPath`` prefix, in arguments, env values and exec probes, is
rewritten to ``<tmp>/pods/<pod>/volumes/<volume>[/<subPath>]``:

- emptyDir and volumeClaimTemplates volumes are empty directories that live as long as
  the test does;
- configMap volumes have their keys written as files, so a probe script mounted from a
  ConfigMap (prod's ``grpc-health-check.py``) runs from the rendered copy of the
  repository file;
- a Secret, or any other kind of volume, fails the test (dev has none).

If ``/tmp`` is mounted, it becomes ``TMPDIR``. The working directory is the image's
WORKDIR if a mount covers it, else an empty per-pod directory. A ``--data-dir`` outside
every mount fails the test: every container runs with a read-only root filesystem.

Probes:

- ``grpc``: ``grpc.health.v1`` Check with the probe's ``service`` must be SERVING.
- ``httpGet``: GET on the mapped port must be 200.
- ``tcpSocket``: must connect.
- ``exec``: the command is mapped and rewritten as above and must exit 0. As in the
  kubelet, only ``$(VAR)`` of env entries with a plain ``value`` is expanded there (it
  gives ``valueFrom`` variables an empty value): a reference to any other variable fails.

Each probe is polled for up to 30 s. Probe timing (periods, thresholds) is not what this
test checks.

One allowed difference: etcd 3.5 serves ``/livez`` and ``/readyz`` on its metrics
listener, and etcd 3.4 answers 404 there. When the local etcd is older than 3.5 and the
manifest's path answers 404, the etcd probe is checked at the 3.4 path in
``ETCD_34_PROBE_PATHS`` and a warning names the substitution.

Processes are stopped by pid at the end: SIGTERM, then SIGKILL. Before that, the test checks
that each oribus container exits 0 on SIGTERM within its terminationGracePeriodSeconds.
Process output goes to ``<tmp>/logs/<pod>.<container>.log``. On failure, the tails of the
logs are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_k8s_manifests import (
    config_data,
    dockerfile_stages,
    is_oribus,
    objects,
    one,
    render,
    selects,
    workloads,
)

import oribus
from oribus.errors import Conflict
from oribus.meta.etcd import EtcdMeta

OVERLAY = "overlays/dev"
NAMESPACE = "oribus-test"  # what the downward API gives metadata.namespace
POD_IP = "127.0.0.1"  # status.podIP, and where every port is mapped
CLUSTER_DOMAIN = "cluster.local"  # deploy/k8s/README.md: the manifests assume it
PROBE_TIMEOUT = 30.0  # seconds each probe (and each declared port) has to succeed
JOB_TIMEOUT = 30.0
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
LOCAL_HOSTS = ("0.0.0.0", "127.0.0.1", "localhost", "[::]", "[::1]")  # a pod's own addresses
ETCD_IMAGE = "quay.io/coreos/etcd"
# etcd 3.5 answers these on --listen-metrics-urls. The Debian etcd 3.4 answers 404 there and
# has only /health (it checks leader, alarms and a read, as /readyz does). Used only for the
# etcd image, only with a local etcd older than 3.5, and only after the manifest's path
# answered 404; each use is reported as a warning.
ETCD_34_PROBE_PATHS = {"/livez": "/health", "/readyz": "/health"}

_VAR_REF = re.compile(r"\$(\$|\(([A-Za-z_][A-Za-z0-9_.-]*)\))")
# (scheme://)?host:port, host a DNS name, an IPv4 address or a bracketed IPv6 address
_ADDRESS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?"
    r"(?P<host>\[[0-9A-Fa-f:.]*\]|[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?)"
    r":(?P<port>\d{1,5})(?!\d)"
)


# ---- the images -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """What a container image provides, as far as running it here is concerned."""

    entrypoint: tuple[str, ...]  # ENTRYPOINT; empty: the command comes from the manifest
    executables: dict[str, tuple[str, ...]]  # path in the image -> local argv prefix
    env: dict[str, str]  # ENV, without PATH
    workdir: str | None  # WORKDIR


@functools.cache
def local_etcd() -> tuple[str, tuple[int, int]]:
    """The local etcd binary and its (major, minor) version."""
    path = shutil.which("etcd")
    if path is None:
        pytest.fail("etcd is not installed: `make test` installs it (apt-get install etcd-server)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"etcd Version: (\d+)\.(\d+)", out.stdout)
    assert found, f"cannot read the version of {path}: {out.stdout}{out.stderr}"
    return path, (int(found.group(1)), int(found.group(2)))


@functools.cache
def oribus_image() -> Image:
    """The Dockerfile's runtime stage: ENTRYPOINT ["oribus"], its ENV and WORKDIR."""
    runtime = dockerfile_stages()[-1]
    last = {instr: rest for instr, rest in runtime}
    assert json.loads(last["ENTRYPOINT"]) == ["oribus"], last["ENTRYPOINT"]
    env = {}
    for instr, rest in runtime:
        if instr == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(rest))
    env.pop("PATH")  # /opt/venv/bin first: here, this venv's bin first (LocalKubelet.prepare)
    python = (sys.executable,)
    oribus_cli = (sys.executable, "-m", "oribus.cli")
    return Image(
        entrypoint=("oribus",),
        executables={"oribus": oribus_cli, "/opt/venv/bin/oribus": oribus_cli,
                     "python": python, "python3": python, "/opt/venv/bin/python": python},
        env={"LANG": "C.UTF-8", **env},  # LANG: set by the python:3.11-slim base image
        workdir=last.get("WORKDIR"),
    )


def is_etcd(c: dict) -> bool:
    return c["image"].split("@")[0].rsplit(":", 1)[0] == ETCD_IMAGE


def image_of(c: dict) -> Image:
    if is_oribus(c):
        return oribus_image()
    if is_etcd(c):
        etcd = (local_etcd()[0],)
        return Image(entrypoint=(), executables={"etcd": etcd, "/usr/local/bin/etcd": etcd}, env={},
                     workdir=None)
    pytest.fail(f"{c['name']}: no local mapping for the image {c['image']}")


def local_argv(image: Image, argv: list[str], where: str) -> list[str]:
    """``argv`` as the image would run it, with its executable replaced by the local one."""
    assert argv, f"{where}: nothing to run"
    prefix = image.executables.get(argv[0])
    assert prefix is not None, f"{where}: {argv[0]!r} is not an executable this test maps"
    return [*prefix, *argv[1:]]


# ---- pods ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pod:
    """One pod of a workload, with its local ports and volume directories."""

    name: str
    workload: dict
    root: Path  # <tmp>/pods/<name>
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> port on 127.0.0.1
    port_names: dict[str, int] = field(default_factory=dict)  # port name -> containerPort
    volumes: dict[str, Path] = field(default_factory=dict)  # volume name -> its directory here

    @property
    def template(self) -> dict:
        return self.workload["spec"]["template"]

    @property
    def spec(self) -> dict:
        return self.template["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"].get("labels", {})

    def container_port(self, port: int | str) -> int:
        """A probe's or Service's port (a number or a port name) as a declared containerPort."""
        number = self.port_names.get(port) if isinstance(port, str) else port
        assert number in self.ports, f"{self.name}: port {port!r} is not a declared containerPort"
        return number

    def local_port(self, port: int | str) -> int:
        return self.ports[self.container_port(port)]


def pod_names(workload: dict) -> list[str]:
    name, kind = workload["metadata"]["name"], workload["kind"]
    replicas = workload["spec"].get("replicas", 1) if kind != "Job" else 1
    if kind == "StatefulSet":
        return [f"{name}-{i}" for i in range(replicas)]
    return [f"{name}-local"] if replicas == 1 else [f"{name}-local-{i}" for i in range(replicas)]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports nobody listens on now (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((POD_IP, 0))
        return [s.getsockname()[1] for s in socks]


def expand(text: str, env: dict[str, str], where: str) -> str:
    """The kubelet's ``$(VAR)`` expansion; ``$$`` is a literal ``$``. Undefined names fail."""

    def one_ref(m: re.Match[str]) -> str:
        if m.group(1) == "$":
            return "$"
        assert m.group(2) in env, f"{where}: $({m.group(2)}) in {text!r} is not defined here"
        return env[m.group(2)]

    return _VAR_REF.sub(one_ref, text)


@dataclass
class Proc:
    """One container of a pod as a local process; its output goes to ``log_path``."""

    pod: Pod
    container: dict
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    popen: subprocess.Popen | None = None

    @property
    def label(self) -> str:
        return f"{self.pod.name}/{self.container['name']}"

    @property
    def grace(self) -> float:
        return float(self.pod.spec.get("terminationGracePeriodSeconds", 30))

    def start(self) -> Proc:
        with open(self.log_path, "a") as log:
            log.write(f"$ {shlex.join(self.argv)}\n")
            log.flush()
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env)
        return self

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, grace: float) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code. Idempotent."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LocalKubelet:
    """Runs the pods of rendered manifests as local processes (rules: the module docstring)."""

    def __init__(self, docs: tuple[dict, ...], root: Path) -> None:
        self.docs = docs
        self.root = root
        (root / "logs").mkdir(parents=True)
        self.pods = {n: Pod(n, w, root / "pods" / n) for w in workloads(docs) for n in pod_names(w)}
        self.procs: list[Proc] = []
        self._allocate_ports()
        self.addresses = self._address_table()
        for pod in self.pods.values():
            self._make_volumes(pod)

    # ---- the tables ---------------------------------------------------------------------

    def _allocate_ports(self) -> None:
        declared = []
        for pod in self.pods.values():
            for c in self.containers(pod, init=True):
                for p in c.get("ports", []):
                    assert p.get("protocol", "TCP") == "TCP", f"{pod.name}: only TCP ports are mapped"
                    assert p["containerPort"] not in pod.ports, f"{pod.name}: port {p['containerPort']} twice"
                    pod.ports[p["containerPort"]] = 0
                    if "name" in p:
                        pod.port_names[p["name"]] = p["containerPort"]
                    declared.append((pod, p["containerPort"]))
        for (pod, port), local in zip(declared, free_ports(len(declared)), strict=True):
            pod.ports[port] = local

    def _address_table(self) -> dict[tuple[str, int], int]:
        """(DNS name, port) -> local port, from the Services and the pods they select."""
        table: dict[tuple[str, int], int] = {}

        def add(names: list[str], port: int, local: int) -> None:
            for name in names:
                assert table.setdefault((name, port), local) == local, f"{name}:{port} maps to two pods"

        def dns(name: str) -> list[str]:
            return [name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc",
                    f"{name}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"]

        for svc in objects(self.docs, "Service"):
            name, spec = svc["metadata"]["name"], svc["spec"]
            backing = [p for p in self.pods.values() if selects({"matchLabels": spec["selector"]}, p.labels)]
            assert backing, f"Service {name} selects no pod"
            if spec.get("clusterIP") == "None":  # headless: DNS names resolve to the pods themselves
                for pod in backing:
                    if pod.workload["kind"] == "StatefulSet" and pod.workload["spec"]["serviceName"] == name:
                        for port, local in pod.ports.items():
                            add(dns(f"{pod.name}.{name}"), port, local)
                for port, local in backing[0].ports.items():
                    add(dns(name), port, local)
            else:
                for sp in spec["ports"]:
                    add(dns(name), sp["port"], backing[0].local_port(sp.get("targetPort", sp["port"])))
        return table

    def _make_volumes(self, pod: Pod) -> None:
        claims = [t["metadata"]["name"] for t in pod.workload["spec"].get("volumeClaimTemplates", [])]
        for name in claims:
            pod.volumes[name] = pod.root / "volumes" / name
            pod.volumes[name].mkdir(parents=True)
        for vol in pod.spec.get("volumes", []):
            path = pod.volumes[vol["name"]] = pod.root / "volumes" / vol["name"]
            path.mkdir(parents=True)
            if "configMap" in vol:
                data = config_data(self.docs, vol["configMap"]["name"])
                items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    (path / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                    (path / item["path"]).write_text(data[item["key"]])
            elif not {"emptyDir", "persistentVolumeClaim"} & set(vol):
                pytest.fail(f"{pod.name}: volume {vol['name']} is of a kind this test cannot provide: {vol}")

    def describe(self) -> str:
        """The rewrite table, for the test's output."""
        lines = []
        for pod in self.pods.values():
            ports = ", ".join(f"{port}->{local}" for port, local in pod.ports.items()) or "no ports"
            lines.append(f"{pod.name}: {ports}; volumes under {pod.root / 'volumes'}")
        for (name, port), local in sorted(self.addresses.items()):
            lines.append(f"  {name}:{port} -> 127.0.0.1:{local}")
        return "\n".join(lines)

    # ---- rewriting ----------------------------------------------------------------------

    def rewrite_addresses(self, text: str, pod: Pod | None, where: str) -> str:
        """Every (scheme://)?host:port in ``text`` as 127.0.0.1:<local port>; ``pod`` is the
        pod the text belongs to (None: a client outside the pods)."""

        def one_address(m: re.Match[str]) -> str:
            host, port = m.group("host"), int(m.group("port"))
            if pod is not None and (host in LOCAL_HOSTS or host == pod.name) and port in pod.ports:
                local = pod.ports[port]
            elif (host, port) in self.addresses:
                local = self.addresses[(host, port)]
            else:
                pytest.fail(f"{where}: {m.group(0)!r} in {text!r} has no local mapping")
            return f"{m.group('scheme') or ''}{POD_IP}:{local}"

        return _ADDRESS.sub(one_address, text)

    def rewrite_paths(self, text: str, pod: Pod, c: dict) -> str:
        """Each mountPath prefix of the container's volumeMounts as the volume's directory here."""
        mounts = {}
        for m in c.get("volumeMounts", []):
            assert m["name"] in pod.volumes, f"{pod.name}/{c['name']}: mount of an unknown volume {m['name']}"
            mounts[m["mountPath"].rstrip("/")] = pod.volumes[m["name"]] / m.get("subPath", "")
        if not mounts:
            return text
        alternatives = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        # one pass, so that a replaced path is never matched again by a shorter mount (/tmp)
        pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])")
        return pattern.sub(lambda m: str(mounts[m.group(1)]).rstrip("/"), text)

    def rewrite_argv(self, argv: list[str], pod: Pod, c: dict, where: str) -> list[str]:
        out = [self.rewrite_paths(self.rewrite_addresses(a, pod, where), pod, c) for a in argv]
        for i, arg in enumerate(out):  # --port P / --port=P, P a containerPort of this pod
            if i and out[i - 1] == "--port" and arg.isdigit() and int(arg) in pod.ports:
                out[i] = str(pod.ports[int(arg)])
            elif arg.startswith("--port=") and arg[7:].isdigit() and int(arg[7:]) in pod.ports:
                out[i] = f"--port={pod.ports[int(arg[7:])]}"
        return out

    # ---- what the kubelet does -----------------------------------------------------------

    def containers(self, pod: Pod, *, init: bool) -> list[dict]:
        return [*(pod.spec.get("initContainers", []) if init else []), *pod.spec["containers"]]

    def container_env(self, pod: Pod, c: dict) -> dict[str, str]:
        """envFrom, then env in order, each value seeing only what was defined before it."""
        where = f"{pod.name}/{c['name']}"
        env: dict[str, str] = {}
        for src in c.get("envFrom", []):
            assert "configMapRef" in src, f"{where}: only configMapRef envFrom can be provided here"
            data = config_data(self.docs, src["configMapRef"]["name"])
            env.update({src.get("prefix", "") + k: v for k, v in data.items()})
        for var in c.get("env", []):
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env, where)
                continue
            source = var["valueFrom"]
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                data = config_data(self.docs, ref["name"])
                assert ref["key"] in data, f"{where}: ConfigMap {ref['name']} has no key {ref['key']}"
                env[var["name"]] = data[ref["key"]]
            elif "fieldRef" in source:
                fields = {"metadata.name": pod.name, "metadata.namespace": NAMESPACE, "status.podIP": POD_IP}
                path = source["fieldRef"]["fieldPath"]
                assert path in fields, f"{where}: fieldRef {path} is not provided here"
                env[var["name"]] = fields[path]
            else:
                pytest.fail(f"{where}: env {var['name']} has a source this test cannot provide: {source}")
        return env

    def mapped_dir(self, pod: Pod, c: dict, path: str | None) -> Path | None:
        """Where an absolute path of the container lives here, if a volume covers it."""
        if path is None:
            return None
        rewritten = self.rewrite_paths(path, pod, c)
        return Path(rewritten) if rewritten != path else None

    def prepare(self, pod: Pod, c: dict) -> Proc:
        where = f"{pod.name}/{c['name']}"
        image = image_of(c)
        env = self.container_env(pod, c)
        raw = [*(c["command"] if "command" in c else image.entrypoint), *c.get("args", [])]
        argv = self.rewrite_argv([expand(a, env, where) for a in raw], pod, c, where)
        for flag, value in flag_values(argv, "--data-dir"):
            assert Path(value).is_relative_to(pod.root), (
                f"{where}: {flag} {value} is on the read-only root filesystem, not on a volume")
        cwd = self.mapped_dir(pod, c, image.workdir) or pod.root / "workdir"
        cwd.mkdir(parents=True, exist_ok=True)
        process_env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOSTNAME": pod.name,
            "HOME": str(cwd),
            **image.env,
            **{k: self.rewrite_paths(self.rewrite_addresses(v, pod, where), pod, c) for k, v in env.items()},
        }
        tmp = self.mapped_dir(pod, c, "/tmp")
        if tmp is not None:
            process_env["TMPDIR"] = str(tmp)
        log = self.root / "logs" / f"{pod.name}.{c['name']}.log"
        return Proc(pod, c, local_argv(image, argv, where), process_env, cwd, log)

    def start(self, pod: Pod) -> list[Proc]:
        """Init containers to completion (each must exit 0), then every container."""
        for c in pod.spec.get("initContainers", []):
            proc = self.prepare(pod, c).start()
            self.procs.append(proc)
            assert proc.popen is not None
            code = proc.popen.wait(JOB_TIMEOUT)
            assert code == 0, f"init container {proc.label} exited {code}:\n{proc.tail()}"
        started = [self.prepare(pod, c).start() for c in pod.spec["containers"]]
        self.procs.extend(started)
        return started

    def run_job(self, pod: Pod) -> list[str]:
        """Run a Job's pod once to completion; every container must exit 0. Their logs."""
        outputs = []
        for proc in self.start(pod):
            assert proc.popen is not None
            try:
                code = proc.popen.wait(JOB_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{proc.label} did not finish within {JOB_TIMEOUT}s:\n{proc.tail()}")
            assert code == 0, f"{proc.label} exited {code}:\n{proc.tail()}"
            outputs.append(proc.log_path.read_text())
        return outputs

    def wait_until(self, pod: Pod, what: str, check: Callable[[], str | None]) -> None:
        """Poll ``check`` (None: success, else why not) while the pod's processes run."""
        deadline = time.monotonic() + PROBE_TIMEOUT
        # each container's latest process (one killed earlier and started again is not it)
        running = list({p.container["name"]: p for p in self.procs if p.pod is pod}.values())
        while True:
            for p in running:
                if p.exit_code() is not None:
                    pytest.fail(f"{p.label} exited with {p.exit_code()} while waiting for {what}:\n{p.tail()}")
            why = check()
            if why is None:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"==== {p.label}\n{p.tail()}" for p in running)
                pytest.fail(f"{pod.name}: {what} failed for {PROBE_TIMEOUT}s: {why}\n{tails}")
            time.sleep(0.1)

    def wait_ports(self, pod: Pod) -> None:
        """Every declared containerPort accepts connections (the listen flags match them)."""
        for port, local in pod.ports.items():
            self.wait_until(pod, f"containerPort {port} (127.0.0.1:{local})", lambda local=local: tcp_check(local))

    def check_probes(self, pod: Pod) -> list[str]:
        """Each container's startup, liveness and readiness probes succeed. What was checked."""
        checked = []
        for c in self.containers(pod, init=False):
            for kind in PROBES:
                if kind in c:
                    what = f"{c['name']} {kind} {describe_probe(c[kind])}"
                    self.wait_until(pod, what, self.probe_check(pod, c, c[kind]))
                    checked.append(what)
        return checked

    def probe_check(self, pod: Pod, c: dict, probe: dict) -> Callable[[], str | None]:
        where = f"{pod.name}/{c['name']}"
        if "grpc" in probe:
            address = f"{POD_IP}:{pod.local_port(probe['grpc']['port'])}"
            return lambda: grpc_health_check(address, probe["grpc"].get("service", ""))
        if "httpGet" in probe:
            get = probe["httpGet"]
            assert get.get("scheme", "HTTP") == "HTTP", f"{where}: only HTTP probes are mapped"
            assert get.get("host", POD_IP) == POD_IP, f"{where}: a probe host other than the pod's IP"
            base = f"http://{POD_IP}:{pod.local_port(get['port'])}"
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
            fallback = ETCD_34_PROBE_PATHS.get(get.get("path", "/"))
            if not (is_etcd(c) and local_etcd()[1] < (3, 5)):
                fallback = None
            return lambda: http_probe(base, get.get("path", "/"), headers, fallback, where)
        if "tcpSocket" in probe:
            local = pod.local_port(probe["tcpSocket"]["port"])
            return lambda: tcp_check(local)
        if "exec" in probe:
            proc = self.prepare(pod, c)  # the container's environment and working directory
            static = {v["name"]: v.get("value", "") for v in c.get("env", []) if "valueFrom" not in v}
            expanded = [expand(a, static, f"{where} exec probe") for a in probe["exec"]["command"]]
            argv = local_argv(image_of(c), self.rewrite_argv(expanded, pod, c, where), where)
            return lambda: exec_check(argv, proc.env, proc.cwd)
        pytest.fail(f"{where}: a probe of a kind this test does not know: {probe}")

    def pods_of(self, kind: str, name: str) -> list[Pod]:
        workload = one(self.docs, kind, name)
        return [self.pods[n] for n in pod_names(workload)]

    def stop(self, procs: list[Proc], grace: float | None = None) -> dict[str, int | None]:
        """Stop by pid, last started first: SIGTERM, then SIGKILL after the grace period."""
        return {p.label: p.stop(p.grace if grace is None else grace) for p in reversed(procs)}

    def log_tails(self) -> str:
        return "\n".join(f"==== {p.label} ({p.log_path})\n{p.tail()}" for p in self.procs)


def flag_values(argv: list[str], name: str) -> list[tuple[str, str]]:
    out = [(name, argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == name]
    return out + [(name, a.split("=", 1)[1]) for a in argv if a.startswith(name + "=")]


def describe_probe(probe: dict) -> str:
    for kind in ("grpc", "httpGet", "tcpSocket", "exec"):
        if kind in probe:
            return f"{kind} {json.dumps(probe[kind], sort_keys=True)}"
    return json.dumps(probe)


# ---- the probes -----------------------------------------------------------------------------------


def tcp_check(port: int) -> str | None:
    with socket.socket() as s:
        s.settimeout(2)
        code = s.connect_ex((POD_IP, port))
    return None if code == 0 else f"connect to {POD_IP}:{port}: {os.strerror(code)}"


def grpc_health_check(address: str, service: str) -> str | None:
    """What kubelet's gRPC probe does: grpc.health.v1 Check(service) must be SERVING."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as e:
            return f"{address} health({service!r}): {e.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return None if status == "SERVING" else f"{address} health({service!r}): {status}"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(method: str, url: str, body: dict | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _NO_PROXY.open(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_probe(base: str, path: str, headers: dict[str, str], fallback: str | None, where: str) -> str | None:
    try:
        status, body = http_request("GET", base + path, headers=headers)
        if status == 404 and fallback is not None:
            status, body = http_request("GET", base + fallback, headers=headers)
            if status == 200:
                warnings.warn(f"{where}: the local etcd is 3.4, which has no {path}; its probe was "
                              f"checked at {fallback} (ETCD_34_PROBE_PATHS)", stacklevel=1)
                return None
    except OSError as e:
        return f"GET {base}{path}: {e}"
    return None if status == 200 else f"GET {base}{path}: {status} {body[:200]!r}"


def exec_check(argv: list[str], env: dict[str, str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return f"{shlex.join(argv)} did not finish in 15 s"
    return None if out.returncode == 0 else f"{shlex.join(argv)} exited {out.returncode}: {out.stderr[-500:]}"


# ---- traffic ---------------------------------------------------------------------------------


def key_on(slot_map, shard: int, prefix: str) -> str:
    return next(k for k in (f"{prefix}/{i}" for i in range(100_000)) if slot_map.shard_for(k) == shard)


async def sdk_traffic(bus: str, etcd: str, cluster: str, shards: int, advertised: dict[int, set[str]]) -> list[str]:
    """Commits on both shards through the bus, a two-shard commit, reads, a stale read. Shard n
    must be served at one of ``advertised[n]`` (its pod, or its group's members). The keys used,
    one per shard, each at version 3 (shard 0's) or 2."""
    meta = EtcdMeta(etcd, cluster)
    try:
        config = await meta.config()
        records = await meta.shards()
    finally:
        await meta.close()
    assert config.shards == shards, config  # what the Job wrote
    # every shard claimed its id at the address it was told to advertise
    assert set(records) == set(range(shards)), records
    assert all(records[n].address in advertised[n] for n in range(shards)), (records, advertised)
    slot_map = config.slot_map()
    keys = [key_on(slot_map, s, "launch") for s in range(shards)]

    async with oribus.connect(bus, agent="planner") as planner:
        for i, k in enumerate(keys):
            assert await planner.put(k, {"step": i}) == 1
        before = (await planner.stats())["coordinator"]["commits_2pc"]
        assert await planner.commit({k: {"step": 10 + i} for i, k in enumerate(keys)}) == dict.fromkeys(keys, 2)
        stats = await planner.stats()
        assert stats["coordinator"]["commits_2pc"] == before + 1, stats["coordinator"]
        assert {s["shard"]: s["keys"] for s in stats["shards"]} == dict.fromkeys(range(shards), 1), stats

        reviewer = planner.session(agent="reviewer")
        got = await reviewer.get_many(keys)
        assert [(got[k].value, got[k].version) for k in keys] == [({"step": 10 + i}, 2) for i in range(shards)]
        # the planner changes what the reviewer read on shard 0; the reviewer's commit to
        # shard 1, based on that read, is refused and writes nothing
        assert await planner.put(keys[0], {"step": 99}) == 3
        with pytest.raises(Conflict) as refused:
            await reviewer.commit({keys[1]: {"by": "reviewer"}})
        assert type(refused.value) is Conflict
        assert [tuple(s) for s in refused.value.stale] == [(keys[0], 2, 3, "stale_read")]
        assert (await planner.get(keys[1])).value == {"step": 11}
    return keys


def http_traffic(http: str, shards: int) -> None:
    """/readyz and the S-Bus routes through the bus's HTTP port."""
    status, body = http_request("GET", f"http://{http}/readyz")
    assert status == 200, body
    ready = json.loads(body)
    assert (ready["status"], ready["shards"], ready["down"], ready["unregistered"]) == ("ready", shards, [], []), ready
    status, body = http_request("POST", f"http://{http}/shard",
                                {"key": "launch-sbus", "content": "draft", "goal_tag": "launch"})
    assert status == 201, body
    assert json.loads(body)["version"] == 0
    status, body = http_request("GET", f"http://{http}/shard/launch-sbus?agent_id=writer")
    assert status == 200, body
    got = json.loads(body)
    assert (got["key"], got["content"], got["version"], got["goal_tag"]) == ("launch-sbus", "draft", 0, "launch")


# ---- the test ------------------------------------------------------------------------------------


def test_dev_overlay_runs_as_local_processes(tmp_path: Path) -> None:
    docs = render(OVERLAY)
    local_etcd()  # fail now, not half-way, if etcd is missing
    kubelet = LocalKubelet(docs, tmp_path)
    print(f"rewrite table (namespace {NAMESPACE}):\n{kubelet.describe()}")
    config = config_data(docs)
    shards = int(config["ORIBUS_SHARDS"])
    try:
        etcd = kubelet.pods_of("StatefulSet", "oribus-etcd")
        for pod in etcd:  # podManagementPolicy Parallel: the members start together
            kubelet.start(pod)
        for pod in etcd:
            kubelet.wait_ports(pod)
            print(pod.name, "probes:", kubelet.check_probes(pod))

        (init,) = kubelet.pods_of("Job", "oribus-cluster-init")
        (first,) = kubelet.run_job(init)
        assert {"cluster": config["ORIBUS_CLUSTER"], "shards": shards, "replicas": 1,
                "created": True} in json_lines(first)
        # the Job may run again (restartPolicy OnFailure, backoffLimit): that must be harmless
        (again,) = kubelet.run_job(init)
        assert {"cluster": config["ORIBUS_CLUSTER"], "shards": shards, "replicas": 1,
                "created": False} in json_lines(again)

        shard_pods = kubelet.pods_of("StatefulSet", "oribus-shard")
        assert len(shard_pods) == shards, f"ORIBUS_SHARDS is {shards}, there are {len(shard_pods)} shard pods"
        for pod in shard_pods:
            kubelet.start(pod)
        for pod in shard_pods:
            kubelet.wait_ports(pod)
            print(pod.name, "probes:", kubelet.check_probes(pod))

        bus_pods = kubelet.pods_of("Deployment", "oribus-bus")
        for pod in bus_pods:
            kubelet.start(pod)
        for pod in bus_pods:
            kubelet.wait_ports(pod)
            print(pod.name, "probes:", kubelet.check_probes(pod))

        # the addresses a client in the namespace uses (deploy/k8s/README.md), through the table
        bus_grpc = kubelet.rewrite_addresses(f"oribus-bus.{NAMESPACE}.svc:7700", None, "client")
        bus_http = kubelet.rewrite_addresses(f"oribus-bus.{NAMESPACE}.svc:7780", None, "client")
        etcd_urls = kubelet.rewrite_addresses(config["ORIBUS_ETCD"], None, "client")
        advertised = {n: {f"{POD_IP}:{pod.ports[7801]}"} for n, pod in enumerate(shard_pods)}
        asyncio.run(sdk_traffic(bus_grpc, etcd_urls, config["ORIBUS_CLUSTER"], shards, advertised))
        http_traffic(bus_http, shards)

        # the kubelet's stop: SIGTERM, then SIGKILL after terminationGracePeriodSeconds
        codes = kubelet.stop([p for p in kubelet.procs if p.pod is not init and is_oribus(p.container)])
        assert codes == dict.fromkeys(codes, 0), f"not a clean exit on SIGTERM: {codes}\n{kubelet.log_tails()}"
    except BaseException:
        print(kubelet.log_tails())
        raise
    finally:
        kubelet.stop(kubelet.procs, grace=10)


REPLICATED = "overlays/replicated"
FAILOVER_TIMEOUT = 60.0  # seconds for writes to flow again after the primary's kill (2 x TTL is the target)


async def group_primary(etcd: str, cluster: str, shard: int, other_than: int = -1,
                        timeout: float = FAILOVER_TIMEOUT) -> int:
    """The member etcd names primary of ``shard`` (not ``other_than``), once there is one."""
    from oribus.meta.groups import EtcdGroups

    meta = EtcdMeta(etcd, cluster)
    deadline = time.monotonic() + timeout
    try:
        while True:
            primary = await EtcdGroups(meta).primary(shard)
            if primary is not None and primary.member != other_than:
                return primary.member
            assert time.monotonic() < deadline, f"shard {shard}: no primary other than {other_than} in {timeout}s"
            await asyncio.sleep(0.2)
    finally:
        await meta.close()


async def writes_flow_again(bus: str, key: str, timeout: float = FAILOVER_TIMEOUT) -> tuple[int, float]:
    """Commit to ``key`` through the bus until one is acknowledged: (its version, seconds taken).
    Until the group has a primary again the bus answers Unavailable (retried here)."""
    from oribus.errors import Unavailable

    started = time.monotonic()
    while True:
        try:
            async with oribus.connect(bus, agent="after-failover", timeout=5.0) as s:
                return await s.put(key, {"after": "failover"}), time.monotonic() - started
        except Unavailable:
            assert time.monotonic() - started < timeout, f"no write to {key} acknowledged in {timeout}s"
            await asyncio.sleep(0.5)


def test_replicated_overlay_runs_as_local_processes_and_survives_the_primary_s_kill(tmp_path: Path) -> None:
    docs = render(REPLICATED)
    local_etcd()
    kubelet = LocalKubelet(docs, tmp_path)
    print(f"rewrite table (namespace {NAMESPACE}):\n{kubelet.describe()}")
    config = config_data(docs)
    shards, replicas = int(config["ORIBUS_SHARDS"]), int(config["ORIBUS_REPLICAS"])
    cluster = config["ORIBUS_CLUSTER"]
    try:
        etcd = kubelet.pods_of("StatefulSet", "oribus-etcd")
        for pod in etcd:
            kubelet.start(pod)
        for pod in etcd:
            kubelet.wait_ports(pod)
            kubelet.check_probes(pod)
        (init,) = kubelet.pods_of("Job", "oribus-cluster-init")
        (first,) = kubelet.run_job(init)
        assert {"cluster": cluster, "shards": shards, "replicas": replicas, "created": True} in json_lines(first)

        groups = [kubelet.pods_of("StatefulSet", f"oribus-shard-{n}") for n in range(shards)]
        assert [len(g) for g in groups] == [replicas] * shards
        for group in groups:  # podManagementPolicy Parallel: a group's members start together
            for pod in group:
                kubelet.start(pod)
        for group in groups:
            for pod in group:
                kubelet.wait_ports(pod)
                print(pod.name, "probes:", kubelet.check_probes(pod))
        (bus_pod,) = kubelet.pods_of("Deployment", "oribus-bus")
        kubelet.start(bus_pod)
        kubelet.wait_ports(bus_pod)
        print(bus_pod.name, "probes:", kubelet.check_probes(bus_pod))

        bus_grpc = kubelet.rewrite_addresses(f"oribus-bus.{NAMESPACE}.svc:7700", None, "client")
        bus_http = kubelet.rewrite_addresses(f"oribus-bus.{NAMESPACE}.svc:7780", None, "client")
        etcd_urls = kubelet.rewrite_addresses(config["ORIBUS_ETCD"], None, "client")
        # every shard is served by a member of its own group, at the address its pod advertises
        advertised = {n: {f"{POD_IP}:{pod.ports[7801]}" for pod in group} for n, group in enumerate(groups)}
        keys = asyncio.run(sdk_traffic(bus_grpc, etcd_urls, cluster, shards, advertised))
        http_traffic(bus_http, shards)

        # kill -9 the process of shard 0's primary pod
        primary = asyncio.run(group_primary(etcd_urls, cluster, 0))
        (victim,) = [p for p in kubelet.procs if p.pod is groups[0][primary] and p.exit_code() is None]
        assert victim.popen is not None
        victim.popen.kill()
        victim.popen.wait(10)
        killed_at = time.monotonic()
        print(f"killed {victim.label} (member {primary}, pid {victim.popen.pid})")
        successor = asyncio.run(group_primary(etcd_urls, cluster, 0, other_than=primary))
        version, _ = asyncio.run(writes_flow_again(bus_grpc, keys[0]))
        print(f"member {successor} took over; writes flowed again {time.monotonic() - killed_at:.1f}s after the kill")
        assert version == 4  # the three versions acknowledged before the kill survived it

        async def read_back() -> None:
            async with oribus.connect(bus_grpc, agent="reader") as s:
                got = await s.get_many(keys)
            assert [(got[k].value, got[k].version) for k in keys] == (
                [({"after": "failover"}, 4)] + [({"step": 10 + i}, 2) for i in range(1, shards)])

        asyncio.run(read_back())
        # the kubelet restarts the container: the member rejoins its group and is ready again
        kubelet.start(groups[0][primary])
        kubelet.wait_ports(groups[0][primary])
        kubelet.check_probes(groups[0][primary])
        asyncio.run(read_back())

        running = [p for p in kubelet.procs if p.pod is not init and is_oribus(p.container) and p.exit_code() is None]
        codes = kubelet.stop(running)
        assert codes == dict.fromkeys(codes, 0), f"not a clean exit on SIGTERM: {codes}\n{kubelet.log_tails()}"
    except BaseException:
        print(kubelet.log_tails())
        raise
    finally:
        kubelet.stop(kubelet.procs, grace=10)


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out
