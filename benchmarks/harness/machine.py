"""The machine a run was taken on: CPU, memory, kernel, disk, software versions.

Everything is read from the system (``/proc``, ``/sys``, ``os``), the
package metadata and the backends themselves; ``fsync_latency`` measures the
disk the data directories are on, which bounds what a durable commit costs.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["oribus", "grpcio", "msgpack", "uvloop", "aetcd", "redis", "hiredis", "psycopg",
            "psycopg-binary", "matplotlib", "tqdm", "numpy"]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def disk_of(path: Path) -> dict:
    """Filesystem, device and whether it is rotational, for the directory holding ``path``."""
    out: dict = {"path": str(path)}
    try:
        r = subprocess.run(["df", "-PT", str(path)], capture_output=True, text=True, timeout=10)
        fields = r.stdout.splitlines()[-1].split()
        out.update(device=fields[0], filesystem=fields[1], size_gib=round(int(fields[2]) / (1 << 20), 1))
        dev = Path(fields[0]).name
        base = dev.rstrip("0123456789")
        if base.startswith("nvme") and "p" in dev:
            base = dev.rsplit("p", 1)[0]
        rot = _read(f"/sys/block/{base}/queue/rotational").strip()
        if rot:
            out["rotational"] = rot == "1"
        model = _read(f"/sys/block/{base}/device/model").strip()
        if model:
            out["model"] = model
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        pass
    return out


def fsync_latency(path: Path, rounds: int = 200) -> dict:
    """fdatasync of a 256-byte append, as a WAL does: median and p99 in microseconds."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path) as f:
        fd = f.fileno()
        samples = []
        for _ in range(rounds):
            os.write(fd, b"x" * 256)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return {"median_us": round(statistics.median(samples), 1),
            "p99_us": round(samples[int(len(samples) * 0.99) - 1], 1)}


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(repo: Path) -> str:
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return r.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def describe_machine(work_dir: Path, repo: Path) -> dict:
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib(), 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_name(),
        "disk": disk_of(work_dir),
        "fsync_256B": fsync_latency(work_dir),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "event_loop": loop,
        "packages": package_versions(),
        "oribus_commit": git_commit(repo),
    }


def _os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def machine_markdown(machine: dict, backends: dict) -> str:
    disk = machine["disk"]
    disk_text = ", ".join(f"{k} {v}" for k, v in disk.items() if k != "path")
    lines = [
        "# Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores",
        f"- memory: {machine['memory_gib']} GiB",
        f"- OS: {machine['os']}, kernel {machine['kernel']}",
        f"- disk holding the data directories ({disk['path']}): {disk_text}",
        f"- fdatasync of a 256-byte append: median {machine['fsync_256B']['median_us']} µs, "
        f"p99 {machine['fsync_256B']['p99_us']} µs",
        f"- load average when the run started: {machine['load_average_at_start']}",
        f"- Python {machine['python']}, clients on {machine['event_loop']}",
        f"- oribus commit: {machine['oribus_commit']}",
        "",
        "## Backends",
        "",
    ]
    for name, info in backends.items():
        if "error" in info:
            lines.append(f"- **{name}**: not available: {info['error']}")
            continue
        dur = ", ".join(f"{k}={v}" for k, v in info.get("durability", {}).items())
        lines.append(f"- **{name}**: {info.get('version')} ({info.get('binary', 'in the oribus package')}); "
                     f"{info.get('mechanism')}; durability read back: {dur}; "
                     f"{'durable' if info.get('durable') else 'NOT durable'}; client: {info.get('client')}")
        if info.get("command"):
            lines.append(f"  - started as: `{info['command']}`")
    lines += ["", "## Python packages", ""]
    lines += [f"- {k} {v}" for k, v in machine["packages"].items()]
    return "\n".join(lines) + "\n"
