"""The guard of tests/conftest.py: under CI=true a skip off the allow-list fails; allowed reasons
and runs off CI still skip. Each case is a real pytest run (pytester) with this suite's conftest."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

CASES = '''
import pytest

@pytest.fixture
def needs_redis():
    pytest.skip("redis-server not found")

def test_skip_in_body():
    pytest.skip("no server here")

@pytest.mark.skipif(True, reason="PostgreSQL server binaries not found")
def test_skipif_mark():
    pass

def test_skip_in_fixture(needs_redis):
    pass

@pytest.mark.skipif(True, reason="the docker compose plugin is not installed here")
def test_allowed_docker():
    pass

@pytest.mark.skipif(True, reason="needs a machine without CUDA (tests the CPU-only error)")
def test_allowed_gpu():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_xfail():
    assert False

def test_passes():
    pass
'''


@pytest.fixture
def cases(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_cases=CASES)
    return pytester


def test_under_ci_a_skip_off_the_allow_list_fails_with_its_reason(cases: pytest.Pytester,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = cases.runpytest("-rfEs")  # as .ci/run does
    # the body skip fails the test; the mark and the fixture skips happen at setup: errors
    result.assert_outcomes(passed=1, failed=1, errors=2, skipped=2, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    for reason in ("no server here", "PostgreSQL server binaries not found", "redis-server not found"):
        assert f"allow-list of tests/conftest.py: {reason}" in out
    # the short summary names the refused skips, and lists the two allowed ones with their reasons
    result.stdout.fnmatch_lines_random([
        "FAILED test_cases.py::test_skip_in_body - skipped under CI=true *: no server here",
        "ERROR test_cases.py::test_skipif_mark - skipped under CI=true *: PostgreSQL server binaries not found",
        "SKIPPED [[]1[]] test_cases.py:*: the docker compose plugin is not installed here",
        "SKIPPED [[]1[]] test_cases.py:*: needs a machine without CUDA (tests the CPU-only error)",
    ])


def test_off_ci_every_skip_stays_a_skip(cases: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = cases.runpytest()
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_under_ci_a_module_level_importorskip_is_a_collection_error(pytester: pytest.Pytester,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mod='import pytest\npytest.importorskip("no_such_module_here")\n\ndef test_x():\n    pass\n')
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*allow-list of tests/conftest.py: could not import 'no_such_module_here'*"])


def _path_without(program: str, shadow: Path) -> str:
    """PATH with every directory that holds ``program`` replaced by a copy (symlinks) without it."""
    dirs = []
    for i, d in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        src = Path(d)
        if not (src / program).exists():
            dirs.append(d)
            continue
        copy = shadow / str(i)
        copy.mkdir(parents=True)
        for entry in src.iterdir():
            if entry.name != program:
                (copy / entry.name).symlink_to(entry)
        dirs.append(str(copy))
    return os.pathsep.join(dirs)


def _run_fault_tests(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "tests/service/test_faults.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_fault_tests_with_redis_server_hidden_fail_under_ci_and_skip_off_ci(tmp_path: Path) -> None:
    """The issue's check: with redis-server hidden from PATH, the fault tests fail loudly under
    CI=true (each with the reason), and only skip off CI."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRAINYARD_TEST_REDIS_SERVER", "PYTEST_ADDOPTS")}
    env["PATH"] = _path_without("redis-server", tmp_path / "bin")
    assert shutil.which("redis-server", path=env["PATH"]) is None
    n_tests = len(re.findall(r"^def test_", (ROOT / "tests/service/test_faults.py").read_text(), re.M))

    ci = _run_fault_tests({**env, "CI": "true"})
    assert ci.returncode == pytest.ExitCode.TESTS_FAILED, ci.stdout + ci.stderr
    assert re.match(rf"{n_tests} errors in ", ci.stdout.splitlines()[-1]), ci.stdout  # nothing passed or skipped
    assert ci.stdout.count("allow-list of tests/conftest.py: redis-server not found") >= n_tests, ci.stdout

    local = _run_fault_tests({**env, "CI": ""})
    assert local.returncode == pytest.ExitCode.OK, local.stdout + local.stderr
    assert re.match(rf"{n_tests} skipped in ", local.stdout.splitlines()[-1]), local.stdout
    assert "redis-server not found (looked at $TRAINYARD_TEST_REDIS_SERVER and PATH)" in local.stdout
