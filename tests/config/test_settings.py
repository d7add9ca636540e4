"""Settings: one pydantic-settings class (config.settings). Defaults, the TRAINYARD_ variables
(including the older names of four knobs), a .env file, and bad values: a SettingsError naming
the variable and what is allowed, and the server commands refusing to start on one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import Settings, SettingsError, get_settings, settings_from_env, variable_name

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_come_from_the_class_and_the_embedded_urls_from_data_dir(tmp_path):
    s = settings_from_env({"TRAINYARD_DATA_DIR": str(tmp_path)})
    assert s.data_dir == tmp_path.resolve()
    assert s.database_url == f"sqlite:///{tmp_path.resolve() / 'trainyard.db'}"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path.resolve() / 'broker.sqlite'}"
    assert s.artifacts_url == str(tmp_path.resolve() / "artifacts")
    for name, field in Settings.model_fields.items():
        if name not in ("data_dir", "database_url", "broker_url", "artifacts_url"):
            assert getattr(s, name) == field.default, name


def test_every_knob_is_read_from_its_variable():
    env = {
        "TRAINYARD_DATABASE_URL": "postgresql+psycopg://u@h/db", "TRAINYARD_BROKER_URL": "redis://h:1/0",
        "TRAINYARD_QUEUE_PREFIX": "p-", "TRAINYARD_AUTO_QUEUE": "cpu", "TRAINYARD_HEARTBEAT_STALE": "4.5",
        "TRAINYARD_FLUSH_INTERVAL": "0.2", "TRAINYARD_SNAPSHOT_INTERVAL": "0", "TRAINYARD_VISIBILITY_TIMEOUT": "9",
        "TRAINYARD_AUTH": "off", "TRAINYARD_GC_FREEZE": "0", "TRAINYARD_MAX_EPOCHS": "7", "TRAINYARD_WORKER_NICE": "0",
        "TRAINYARD_PACK": "0", "TRAINYARD_PACK_MAX_MEMBERS": "5", "TRAINYARD_PACK_MAX_PARAMS": "1000",
        "TRAINYARD_FAIR_SHARE_WINDOW_S": "600", "TRAINYARD_PREEMPTION": "1", "TRAINYARD_PREEMPTION_GRACE_S": "2.5",
    }
    s = settings_from_env(env)
    assert (s.database_url, s.broker_url, s.queue_prefix, s.auto_queue) == (
        "postgresql+psycopg://u@h/db", "redis://h:1/0", "p-", "cpu")
    assert (s.heartbeat_stale_s, s.flush_interval_s, s.snapshot_interval_s, s.visibility_timeout_s) == (4.5, 0.2, 0.0, 9)
    assert (s.auth, s.gc_freeze, s.max_epochs, s.worker_nice) == ("off", False, 7, 0)
    assert (s.pack, s.pack_max_members, s.pack_max_params) == (False, 5, 1000)
    assert (s.fair_share_window_s, s.preemption, s.preemption_grace_s) == (600.0, True, 2.5)
    assert s.queue_for_device("auto") == "p-cpu" and s.queue_for_device("cuda:1") == "p-gpu"
    assert variable_name("heartbeat_stale_s") == "TRAINYARD_HEARTBEAT_STALE"
    assert variable_name("max_epochs") == "TRAINYARD_MAX_EPOCHS"


def test_settings_from_env_reads_only_the_mapping_given(monkeypatch):
    monkeypatch.setenv("TRAINYARD_MAX_LAYERS", "3")
    assert settings_from_env({}).max_layers == Settings.model_fields["max_layers"].default
    assert settings_from_env().max_layers == 3


def test_a_dotenv_file_in_the_working_directory_is_read_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("TRAINYARD_MAX_LAYERS=12\nTRAINYARD_AUTH=off\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRAINYARD_MAX_LAYERS", raising=False)
    monkeypatch.setenv("TRAINYARD_AUTH", "required")
    s = settings_from_env()
    assert (s.max_layers, s.auth) == (12, "required")


def test_get_settings_is_cached_once_per_process(monkeypatch):
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("TRAINYARD_MAX_LAYERS", "5")
        first = get_settings()
        monkeypatch.setenv("TRAINYARD_MAX_LAYERS", "6")
        assert get_settings() is first and first.max_layers == 5
    finally:
        get_settings.cache_clear()


def test_a_settings_read_in_flight_when_the_cache_is_cleared_does_not_outlive_the_clear(monkeypatch):
    """A background thread (a service of the process) reads the settings while a test switches the
    environment and clears the cache: the clear waits for that read, so what it read is not what
    the process keeps (with a bare lru_cache the stale read was stored after the clear: a CI run
    wrote a snapshot to the previous test's artifact store)."""
    import threading

    from config import settings as settings_mod

    started, release = threading.Event(), threading.Event()
    real = settings_mod.settings_from_env

    def slow_read() -> Settings:
        got = real()
        if threading.current_thread().name == "background-read":
            started.set()
            release.wait(5)
        return got

    monkeypatch.setattr(settings_mod, "settings_from_env", slow_read)
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("TRAINYARD_FLUSH_INTERVAL", "0.25")
        reader = threading.Thread(target=get_settings, name="background-read")
        reader.start()
        assert started.wait(5)
        monkeypatch.setenv("TRAINYARD_FLUSH_INTERVAL", "0.75")
        clearer = threading.Thread(target=get_settings.cache_clear)
        clearer.start()
        clearer.join(0.3)  # it waits for the read in flight
        release.set()
        reader.join(5)
        clearer.join(5)
        assert get_settings().flush_interval_s == 0.75
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(("var", "value", "allowed"), [
    ("TRAINYARD_AUTH", "maybe", "'required' or 'off'"),
    ("TRAINYARD_AUTO_QUEUE", "tpu", "'gpu' or 'cpu'"),
    ("TRAINYARD_HEARTBEAT_STALE", "soon", "a valid number"),
    ("TRAINYARD_HEARTBEAT_STALE", "0", "greater than 0"),
    ("TRAINYARD_MAX_EPOCHS", "0", "greater than or equal to 1"),
    ("TRAINYARD_GC_FREEZE", "perhaps", "a valid boolean"),
    ("TRAINYARD_WORKER_NICE", "40", "less than or equal to 19"),
    ("TRAINYARD_FAIR_SHARE_WINDOW_S", "0", "greater than 0"),
    ("TRAINYARD_PREEMPTION_GRACE_S", "-1", "greater than or equal to 0"),
])
def test_a_bad_value_names_its_variable_the_value_and_what_is_allowed(var, value, allowed):
    with pytest.raises(SettingsError) as err:
        settings_from_env({var: value})
    msg = str(err.value)
    assert var in msg and repr(value) in msg and allowed in msg, msg


def test_replace_validates_like_the_environment():
    s = settings_from_env({})
    assert s.replace(auth="off").auth == "off" and s.auth == "required"
    with pytest.raises(ValueError):
        s.replace(auth="maybe")


@pytest.mark.parametrize("command", [["api", "--port", "1"], ["worker"], ["serve", "--port", "1"]])
def test_the_server_commands_refuse_to_start_on_a_bad_value(command, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")},
           "PYTHONPATH": str(ROOT), "TRAINYARD_DATA_DIR": str(tmp_path), "TRAINYARD_HEARTBEAT_STALE": "soon"}
    out = subprocess.run([sys.executable, "-m", "client.cli", *command, *(["--data-dir", str(tmp_path)] if command[0] == "serve" else [])],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "TRAINYARD_HEARTBEAT_STALE='soon' is not allowed" in out.stderr and "a valid number" in out.stderr, out.stderr
    assert not (tmp_path / "trainyard.db").exists()  # stopped before migrating or starting anything
