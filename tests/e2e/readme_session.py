"""Runs the README code blocks of one session, as a reader would, and reports what failed.

Started by test_readme.py inside a network namespace of its own (``unshare --net``), so
that the blocks use the README's addresses as written (127.0.0.1:7700, :7780, :7801...)
without meeting any other server. Usage: ``readme_session.py SPEC.json``, where the spec
holds the session's directory and its blocks; prints a JSON report on stdout.

- ```python blocks run as a program (``python block.py``) in the session's directory and
  must exit 0 with nothing on stderr.
- ```sh blocks run line by line (a trailing backslash continues a line). A line that runs a
  server (``oribus up``, ``oribus shard``, ``oribus bus``) or ``oribus watch`` is started in
  the background, as a reader starts it in a terminal of its own: a server is waited for
  until its gRPC address answers the health check, a watch until it printed a change.
  Every other line runs in ``sh`` to completion and must exit 0 without a traceback.
- When the session ends, background commands are stopped by pid, as a reader stops them:
  servers with SIGTERM (they must exit 0), a watch with Ctrl-C (SIGINT; exit 130).
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from processes import health_status  # noqa: E402

from oribus.rpc.wire import DEFAULT_BUS_ADDRESS  # noqa: E402

SERVERS = {"up", "shard", "bus"}
SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING
COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
PR_SET_PDEATHSIG = 1


def say(what: str) -> None:
    """Progress on stderr (the report goes to stdout): what the session was doing if it hangs."""
    print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def die_with_parent() -> None:
    """In the child: SIGKILL when this runner dies, so nothing outlives a killed session."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def shell_lines(code: str) -> list[str]:
    lines, current = [], ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    if current:
        lines.append(current)
    return [line for line in lines if line.strip() and not line.strip().startswith("#")]


def subcommand(argv: list[str]) -> str | None:
    """``up`` of ``oribus -v up ...``; None if the line does not run oribus."""
    if not argv or argv[0] != "oribus":
        return None
    return next((a for a in argv[1:] if not a.startswith("-")), None)


def option(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else default


class Background:
    """A command a reader leaves running in a terminal of its own."""

    def __init__(self, line: str, argv: list[str], kind: str, cwd: Path, env: dict, n: int) -> None:
        self.line, self.argv, self.kind = line, argv, kind
        self.log = cwd / f"background-{n}-{kind}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, cwd: Path) -> str | None:
        """None once ready; else what went wrong."""
        deadline = time.monotonic() + START_TIMEOUT
        address = option(self.argv, "--listen", DEFAULT_BUS_ADDRESS)
        tls = option(self.argv, "--tls-dir")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode} before it was ready:\n{self.output()[-3000:]}"
            if self.kind in SERVERS:
                if health_status(address, tls_dir=cwd / tls if tls else None) == SERVING:
                    return None
            elif self.output().strip():
                return None  # a watch printed its first change
            time.sleep(0.1)
        return f"not ready after {START_TIMEOUT} s:\n{self.output()[-3000:]}"

    def stop(self) -> str | None:
        """Stop it as a reader would; None if it ended cleanly, else what went wrong."""
        if self.proc.poll() is not None:
            return f"exited by itself with {self.proc.returncode}:\n{self.output()[-3000:]}"
        sig, expected = (signal.SIGINT, 130) if self.kind == "watch" else (signal.SIGTERM, 0)
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"did not stop within {STOP_TIMEOUT} s of {sig.name}:\n{self.output()[-3000:]}"
        if code != expected or "Traceback" in self.output():
            return f"exited with {code} on {sig.name} (expected {expected}):\n{self.output()[-3000:]}"
        return None


def run_session(spec: dict) -> list[str]:
    try:
        return _run_session(spec)
    except subprocess.TimeoutExpired as e:
        return [f"`{e.cmd}` did not finish within {e.timeout} s"]


def _run_session(spec: dict) -> list[str]:
    cwd = Path(spec["dir"])
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    failures: list[str] = []
    background: list[Background] = []
    try:
        for block in spec["blocks"]:
            where = f"README.md:{block['line']} ({block['lang']})"
            if block["lang"] == "python":
                path = cwd / f"block-{block['line']}.py"
                path.write_text(block["code"])
                say(f"{where}: running {path.name}")
                r = subprocess.run([sys.executable, path.name], cwd=cwd, env=env, capture_output=True,
                                   text=True, timeout=COMMAND_TIMEOUT, preexec_fn=die_with_parent)
                if r.returncode != 0 or r.stderr:
                    failures.append(f"{where}: exited with {r.returncode}:\n{r.stderr[-3000:]}")
                    return failures
                continue
            for line in shell_lines(block["code"]):
                argv = shlex.split(line, comments=True)
                kind = subcommand(argv)
                if kind in SERVERS or kind == "watch":
                    if any(t in (";", "&&", "||", "|", "&") or t.endswith(";") for t in argv):
                        failures.append(f"{where}: `{line}`: a long-running command must be a line of its own")
                        return failures
                    say(f"{where}: starting `{line}`")
                    proc = Background(line, argv, kind, cwd, env, len(background))
                    background.append(proc)
                    problem = proc.wait_ready(cwd)
                    say(f"{where}: `{line}` {'ready' if problem is None else 'failed'}")
                    if problem:
                        failures.append(f"{where}: `{line}` {problem}")
                        return failures
                    continue
                say(f"{where}: running `{line}`")
                r = subprocess.run(["sh", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                                   timeout=COMMAND_TIMEOUT, preexec_fn=die_with_parent)
                if r.returncode != 0 or "Traceback" in r.stderr:
                    failures.append(f"{where}: `{line}` exited with {r.returncode}:\n"
                                    f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
                    return failures
        return failures
    finally:
        for proc in reversed(background):
            say(f"stopping `{proc.line}`")
            problem = proc.stop()
            if problem:
                failures.append(f"`{proc.line}` {problem}")


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    # a new network namespace starts with its loopback interface down
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(json.dumps({"failures": run_session(spec)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
