"""client/models.py is what scripts/client_models.py generates from the API's OpenAPI document
today: the client's typed results are the API's schemas."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_client_models_are_generated_from_the_current_openapi_document():
    spec = importlib.util.spec_from_file_location("client_models_script", ROOT / "scripts" / "client_models.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (ROOT / "client" / "models.py").read_text() == script.generate(), (
        "client/models.py is out of date: run .venv/bin/python scripts/client_models.py")


def test_the_models_validate_what_the_api_documents():
    from client import models

    job = models.JobSummary.model_validate({
        "id": "a" * 32, "name": "n", "status": "succeeded", "queue": "cpu", "stop_reason": "stalled",
        "progress": {"epoch": 1, "epochs": 1}, "attempts": 1, "cancel_requested": False,
        "created_at": "2026-12-04T00:00:00Z", "updated_at": "2026-12-04T00:00:00Z"})
    assert job.status == "succeeded" and job.stop_reason == "stalled"
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        models.JobSummary.model_validate({**job.model_dump(mode="json"), "status": "finished"})  # not a status
    import json

    quick = json.loads((ROOT / "examples" / "quick.json").read_text())
    assert models.JobSpec.model_validate(quick).epochs == quick["epochs"]  # a spec, typed before it is sent
    with pytest.raises(pydantic.ValidationError):
        models.JobSpec.model_validate({k: v for k, v in quick.items() if k != "loss"})
