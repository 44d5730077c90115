"""A missing optional system part skips its tests, or fails them under REQUIRE_ENV (as CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.system import REQUIRE_ENV

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = """
from tests.support.system import needs, skip_missing

@needs("unobtainium", False, "apt-get install unobtainium")
def test_marked():
    pass

def test_skipped_inside():
    skip_missing("philtrum", "apt-get install philtrum")

@needs("air", True, "nothing to install")
def test_present():
    pass
"""


def run_sample(tmp_path: Path, *, require: bool) -> subprocess.CompletedProcess[str]:
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    if require:
        env[REQUIRE_ENV] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-q",
            "-rfs",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            str(sample),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_missing_part_skips_with_its_reason(tmp_path: Path) -> None:
    result = run_sample(tmp_path, require=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 2 skipped" in result.stdout
    assert "missing system part: unobtainium (install it with: apt-get install unobtainium)" in (
        result.stdout
    )
    assert "missing system part: philtrum" in result.stdout


def test_a_missing_part_fails_where_it_is_required(tmp_path: Path) -> None:
    result = run_sample(tmp_path, require=True)
    assert result.returncode == 1, result.stdout + result.stderr
    # A skip mark acts in the setup phase, so its test errors; a skip inside the test fails.
    assert "1 failed, 1 passed, 1 error" in result.stdout
    assert f"{REQUIRE_ENV}=1 requires it" in result.stdout
