"""Import boundaries: the API never loads torch or the worker; the client stays light."""

from __future__ import annotations

import json
import subprocess
import sys

from .helpers import ROOT

PROBE = """
import json, sys
{code}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'api', 'store', 'fastapi', 'sqlalchemy', 'celery', 'training'))))
"""


def _loaded(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TRAINYARD_DATA_DIR": "/tmp/trainyard-import-probe"})
    assert out.returncode == 0, out.stderr
    return {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_api_app_imports_neither_torch_nor_worker():
    loaded = _loaded("from api.app import create_app; app = create_app(); app.openapi()")
    assert "torch" not in loaded and "worker" not in loaded
    assert {"api", "store", "training", "fastapi"} <= loaded


def test_client_cli_is_light():
    loaded = _loaded("import client.cli")
    assert loaded.isdisjoint({"torch", "fastapi", "sqlalchemy", "celery", "store", "api", "worker", "training"}), loaded


def test_predictions_in_the_api_process_load_onnxruntime_not_torch():
    code = (
        "import json, numpy as np, onnxruntime\n"
        "from api.app import create_app; from api.routers import models; from api.predict import SESSIONS, predict\n"
        "create_app().openapi()"
    )
    loaded = _loaded(code)
    assert "torch" not in loaded and "worker" not in loaded
