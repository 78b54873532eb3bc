"""The command line's own messages: --version, option help with defaults, the bench usage
line, the hint for an unquoted ``put`` value, and the shard count of ``up --processes``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from oribus.cli import build_parser, main
from oribus.hosts.up import UpHost

REPO = Path(__file__).resolve().parents[2]


def oribus_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oribus.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"oribus {version('oribus')}\n"


def subcommands() -> dict:
    return build_parser()._subparsers._group_actions[0].choices


def subcommand_help(command: str) -> str:
    return " ".join(subcommands()[command].format_help().split())  # argparse wraps lines


@pytest.mark.parametrize(("command", "option", "shown"), [
    ("get", "--addr", "(default: 127.0.0.1:7700)"),
    ("put", "--agent", "(default: cli)"),
    ("up", "--listen", "(default: 127.0.0.1:7700)"),
    ("up", "--data-dir", "(default: ./oribus-data)"),
    ("shard", "--listen", "(default: 127.0.0.1:0)"),
    ("bus", "--listen", "(default: 127.0.0.1:7700)"),
    ("bus", "--data-dir", "(default: ./oribus-data/bus)"),
    ("history", "--limit", "(default: all kept)"),
    ("watch", "--from-version", "(default: live changes only)"),
])
def test_options_have_help_and_defaults(command, option, shown):
    text = subcommand_help(command)
    after = text.split(f"{option} {option.lstrip('-').upper().replace('-', '_')} ", 1)
    assert len(after) == 2, f"{option} missing from `oribus {command} --help`:\n{text}"
    help_text = after[1].split(" --", 1)[0]
    assert shown in help_text, f"`oribus {command} --help` shows {option} as: {help_text!r}"


def test_every_option_has_help():
    missing = []
    for name, sub in subcommands().items():
        if name == "bench":  # its options are benchmarks/compare.py's
            continue
        for action in sub._actions:
            if action.option_strings and not action.help:
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []


def test_bench_help_names_oribus_bench():
    r = oribus_cli("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: oribus bench"), r.stdout[:200]


def test_put_of_an_unquoted_string_says_how_to_quote_it(capsys):
    # the value is checked before any connection: nothing listens on the address
    assert main(["put", "k", "hello", "--addr", "127.0.0.1:1"]) == 2
    err = json.loads(capsys.readouterr().err)
    assert err["error"] == "InvalidRequest"
    assert err["message"].startswith("value must be JSON")
    assert err["message"].endswith("""to store the string hello, quote it: oribus put k '"hello"'""")


def test_cluster_init_without_an_etcd_address_says_so(capsys):
    # --etcd is required, but an empty one names no cluster: a clear refusal, not a traceback
    assert main(["cluster", "init", "--shards", "2", "--etcd", ""]) == 2
    assert capsys.readouterr().err.strip() == "oribus cluster init needs --etcd URL"


def test_up_processes_starts_one_shard_per_core(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert UpHost(tmp_path / "p", processes=True).config.shards == 3
    assert UpHost(tmp_path / "e").config.shards == 1
    assert UpHost(tmp_path / "n", processes=True, shards=5).config.shards == 5
