"""Logging (config.logs): one handler, text or JSON lines, the context fields on every record."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from config.logs import configure_logging, in_current_context, job_context, request_id, set_attempt
from config.settings import settings_from_env


@pytest.fixture()
def restore_root():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_json_lines_carry_the_job_and_attempt_and_configuring_twice_keeps_one_handler(capsys, restore_root):
    settings = settings_from_env({"TRAINYARD_LOG_FORMAT": "json"})
    configure_logging(settings, "worker")
    configure_logging(settings, "worker")
    log = logging.getLogger("trainyard.test")
    with job_context("job-1"):
        log.info("before the claim")
        set_attempt(2)
        log.warning("after the claim: %d", 7)
    log.info("outside")
    first, second, outside = (json.loads(line) for line in _lines(capsys))
    assert first == {**first, "msg": "before the claim", "job_id": "job-1", "level": "INFO", "process": "worker",
                     "logger": "trainyard.test"} and "attempt" not in first
    assert second["msg"] == "after the claim: 7" and (second["job_id"], second["attempt"]) == ("job-1", 2)
    assert "job_id" not in outside and "attempt" not in outside


def test_text_lines_show_the_request_id_and_exceptions(capsys, restore_root):
    configure_logging(settings_from_env({}), "api")
    token = request_id.set("abc123")
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("trainyard.test").exception("it failed")
    finally:
        request_id.reset(token)
    err = capsys.readouterr().err
    assert " ERROR trainyard.test [req=abc123] it failed" in err and "RuntimeError: boom" in err


def test_a_thread_started_in_context_carries_the_job(capsys, restore_root):
    configure_logging(settings_from_env({"TRAINYARD_LOG_FORMAT": "json"}), "worker")
    with job_context("job-2", 1):
        t = in_current_context(lambda: logging.getLogger("trainyard.test").info("from the thread"))
        plain = threading.Thread(target=lambda: logging.getLogger("trainyard.test").info("plain thread"))
    t.start(), plain.start()
    t.join(), plain.join()
    by_msg = {d["msg"]: d for d in map(json.loads, _lines(capsys))}
    assert (by_msg["from the thread"]["job_id"], by_msg["from the thread"]["attempt"]) == ("job-2", 1)
    assert "job_id" not in by_msg["plain thread"]


def test_the_level_and_the_access_logger_follow_the_settings(restore_root):
    configure_logging(settings_from_env({"TRAINYARD_LOG_LEVEL": "warning"}), "api")
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("trainyard.access").disabled and logging.getLogger("uvicorn.access").disabled
    configure_logging(settings_from_env({"TRAINYARD_ACCESS_LOG": "1"}), "api")
    assert not logging.getLogger("trainyard.access").disabled and logging.getLogger().level == logging.INFO
    logging.getLogger("trainyard.access").disabled = True
