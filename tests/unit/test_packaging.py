"""The package metadata in the form setuptools accepts without deprecation warnings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_license_is_an_spdx_expression_and_setuptools_reads_it():
    meta = tomllib.loads(PYPROJECT.read_text())
    # the TOML-table form (license = {text = ...}) is deprecated since setuptools 77
    assert meta["project"]["license"] == "Apache-2.0"
    (setuptools,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    found = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert found and int(found.group(1)) >= 77, setuptools  # the first to read SPDX strings
