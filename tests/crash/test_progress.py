"""The sweep's progress lines reach the terminal while its fixture runs, under pytest's
output capture and -q: a pytest run of a module whose fixture reports, then waits until the
line has been read from that run's output."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODULE = textwrap.dedent("""
    import time
    from pathlib import Path
    import pytest

    @pytest.fixture(scope="module")
    def long_setup(crash_progress):
        crash_progress("crash sweep: 1/2 armed runs checked")
        flag = Path(__file__).with_name("seen")
        deadline = time.monotonic() + 20
        while not flag.exists():
            assert time.monotonic() < deadline, "the progress line was not shown while the fixture ran"
            time.sleep(0.05)

    def test_uses_it(long_setup):
        pass
""")


def test_progress_is_shown_while_the_fixture_runs(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_long.py").write_text(MODULE)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        seen_at = None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "crash sweep: 1/2 armed runs checked" in line and seen_at is None:
                seen_at = time.monotonic()
                (tmp_path / "seen").touch()
        assert proc.wait(30) == 0, "".join(lines)
        assert seen_at is not None, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
