"""The README's examples run as written.

Every ```bash and ```python block of README.md is executed, command by command, against a real
``trainyard serve`` (API + worker + SQLite + embedded broker) in a scratch directory, and must
exit 0; a block is left out only when the line before it says why
(``<!-- readme-test: skip (reason) -->``: it starts servers, or needs docker or a keyed
production database, which other tests cover). What the test changes, and nothing else: the
port (``127.0.0.1:8000`` becomes the server's), the placeholders ``JOB_ID`` / ``SWEEP_ID`` (the
ids the earlier commands printed), and the example files, which are copies of ``examples/`` with
fewer epochs and trials so the test stays fast. The errors the README quotes in ``#   path: msg``
comments must be in the output of the command that follows them; the job spec shown as JSON must
validate.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"^<!-- readme-test: skip \((.+)\) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str) -> list[tuple[str, str, str | None, int]]:
    """(language, code, skip reason or None, line number) of every fenced block."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.match(before)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            out.append((m.group(1), "\n".join(lines[i + 1 : end]), skip.group(1) if skip else None, i + 1))
            i = end + 1
        else:
            i += 1
    return out


def shell_commands(code: str) -> list[tuple[str, list[str]]]:
    """A bash block as (command, the '#   ...' expectation lines just before it): commands span
    lines while a line ends in a backslash or a quote is open."""
    out: list[tuple[str, list[str]]] = []
    expect: list[str] = []
    buf = ""
    for line in code.splitlines():
        if not buf and line.lstrip().startswith("#"):
            if line.startswith("#   "):
                expect.append(line[4:].strip())
            elif not line.startswith("# ->"):
                expect = []
            continue
        if not buf and not line.strip():
            continue
        buf = f"{buf}\n{line}" if buf else line
        if buf.endswith("\\"):
            continue
        try:
            shlex.split(buf, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        out.append((buf, expect))
        buf, expect = "", []
    assert not buf, f"unterminated command: {buf}"
    return out


def test_readme_blocks_are_found_and_every_skip_says_why():
    blocks = readme_blocks(README.read_text())
    run = [b for b in blocks if b[0] in ("bash", "python") and b[2] is None]
    assert len(run) >= 5, blocks
    assert any(b[0] == "python" for b in run)
    for lang, _code, reason, line in blocks:
        if reason is not None:
            assert lang == "bash" and len(reason) > 10, (line, reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _small_examples(dest: Path) -> None:
    """Copies of examples/ that train a few epochs (and a sweep of two trials). Not
    ``source-note.json``: the README only cancels it, and a 3-epoch job can end before the
    ``cancel`` that follows its ``submit`` (a 409, as the README's users would see too)."""
    dest.mkdir()
    for f in (ROOT / "examples").glob("*.json"):
        doc = json.loads(f.read_text())
        if "base" in doc:
            doc["base"]["epochs"] = 3
            doc["max_trials"] = 2
            doc.pop("early_termination", None)
        elif f.name != "source-note.json":
            doc["epochs"] = min(doc["epochs"], 3)
        (dest / f.name).write_text(json.dumps(doc, indent=2))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("readme")
    _small_examples(work / "examples")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `trainyard`, `python`
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--data-dir", str(work / "data")],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert "is running" in first, first + proc.stdout.read()  # type: ignore[union-attr]
        env["TRAINYARD_URL"] = f"http://127.0.0.1:{port}"
        yield work, port, env
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_job(url: str, job_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def test_every_readme_example_runs_as_written(served):
    work, port, env = served
    url = env["TRAINYARD_URL"]
    ids: dict[str, str] = {}
    ran = 0
    for lang, code, skip, line in readme_blocks(README.read_text()):
        if skip is not None:
            continue
        if lang == "json":
            doc = json.loads(code)
            if "model" in doc:  # a job spec as shown
                from training import validate_spec

                validate_spec(doc)
            continue
        if lang == "python":
            script = work / f"readme_{line}.py"
            script.write_text(code)
            out = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                                 timeout=600)
            assert out.returncode == 0, f"README line {line}:\n{code}\n{out.stdout}\n{out.stderr}"
            ran += 1
            continue
        if lang != "bash":
            continue
        for command, expect in shell_commands(code):
            cmd = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            for placeholder, value in ids.items():
                cmd = cmd.replace(placeholder, value)
            assert "JOB_ID" not in cmd and "SWEEP_ID" not in cmd, f"README line {line}: no id yet for {command}"
            out = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=600)
            text = out.stdout + out.stderr
            assert out.returncode == 0, f"README line {line}: {command}\n{text}"
            ran += 1
            for e in expect:
                msg = e.split(": ", 1)[1] if ": " in e else e
                msg = msg.removesuffix("...").strip()
                assert msg in text, f"README line {line}: {msg!r} not in the output of {command}:\n{text}"
            if "JOB_ID" not in ids and "-d @examples/quick.json" in command:
                ids["JOB_ID"] = json.loads(out.stdout)["id"]
                assert _wait_job(url, ids["JOB_ID"])["status"] == "succeeded"
            if "SWEEP_ID" not in ids and command.startswith("trainyard sweep examples/"):
                ids["SWEEP_ID"] = out.stdout.split()[0]
            if "-o best.safetensors" in command:
                data = (work / "best.safetensors").read_bytes()
                header = int.from_bytes(data[:8], "little")
                assert json.loads(data[8 : 8 + header]), "not a safetensors file"
    assert ran >= 25 and set(ids) == {"JOB_ID", "SWEEP_ID"}, (ran, ids)


def test_quick_json_is_the_source_note_spec_with_10_epochs_as_the_readme_says():
    note = json.loads((ROOT / "examples" / "source-note.json").read_text())
    quick = json.loads((ROOT / "examples" / "quick.json").read_text())
    assert note["epochs"] == 100 and quick["epochs"] == 10
    assert "`examples/quick.json` is the same spec with 10 epochs instead of 100" in " ".join(README.read_text().split())
    assert {k: v for k, v in quick.items() if k not in ("epochs", "name")} == {
        k: v for k, v in note.items() if k not in ("epochs", "name")}
