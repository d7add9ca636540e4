"""Sweeps through the live service: a real API process and a real Celery worker train every
trial (digits, tiny MLPs, few epochs)."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Any

import optuna
import pytest

from client import Client
from training.sweep_space import sampler_seed

from .helpers import ROOT, wait_status

BASE: dict[str, Any] = {
    "name": "sweep-base",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 64, "standardize": True},
    "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}, {"type": "dense", "units": 10}]},
    "loss": "sparse_categorical_crossentropy",
    "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.01},
    "epochs": 3,
}


def base(**over: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    spec.update(over)
    return spec


def wait_sweep(client: Client, sweep_id: str, timeout: float = 150.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        sweep = client.sweep(sweep_id)
        if sweep["status"] != "running":
            return sweep
        if time.monotonic() > deadline:
            raise TimeoutError(f"sweep {sweep_id} still running after {timeout} s: {sweep['counts']}")
        time.sleep(0.3)


def test_grid_sweep_completes_with_a_best_trial(client: Client) -> None:
    # the base finds its own learning rate ("find"): sweeps may use it too
    sweep = client.create_sweep({
        "name": "grid", "base": base(optimizer={"name": "adam", "learning_rate": "find"}), "method": "grid",
        "parameters": {"model.layers[0].units": {"values": [8, 32]},
                       "model.layers[0].kernel_initializer": {"values": ["glorot_uniform", "he_normal"]}},
        "objective": {"metric": "val_accuracy"}, "max_concurrent": 2,
    })
    assert sweep["status"] == "running" and sweep["max_trials"] == 4  # a grid's size by default
    assert sweep["objective"] == {"metric": "val_accuracy", "mode": "max"}
    assert len(sweep["trials"]) == 2  # max_concurrent at once
    done = wait_sweep(client, sweep["id"])
    assert done["status"] == "succeeded", json.dumps(done)[:3000]
    assert done["counts"]["total"] == done["counts"]["succeeded"] == 4
    combos = {(t["params"]["model.layers[0].units"], t["params"]["model.layers[0].kernel_initializer"]) for t in done["trials"]}
    assert combos == {(8, "glorot_uniform"), (8, "he_normal"), (32, "glorot_uniform"), (32, "he_normal")}
    assert [t["number"] for t in done["trials"]] == [0, 1, 2, 3]
    values = [t["value"] for t in done["leaderboard"]]
    assert values == sorted(values, reverse=True) and len(values) == 4
    best = done["best_trial"]
    assert best["job_id"] == done["best_job_id"] and best["value"] == done["best_value"] == max(values)
    assert best["value"] > 0.8
    # trials are ordinary jobs, listed with their sweep
    jobs = client.jobs(sweep_id=sweep["id"])["jobs"]
    assert sorted(j["trial_number"] for j in jobs) == [0, 1, 2, 3]
    assert all(j["sweep_id"] == sweep["id"] for j in jobs)
    job = client.job(best["job_id"])
    assert job["spec"]["model"]["layers"][0]["units"] == best["params"]["model.layers[0].units"]
    assert job["info"]["lr_find"]["suggested_learning_rate"] > 0
    assert any(s["id"] == sweep["id"] for s in client.sweeps()["sweeps"])


def test_asha_stops_weak_trials_early(client: Client) -> None:
    epochs = 9
    sweep = client.create_sweep({
        "name": "asha", "base": base(epochs=epochs), "method": "random", "seed": 7,
        "parameters": {"optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 0.3}},
        "objective": {"metric": "val_accuracy", "mode": "max"}, "max_trials": 9, "max_concurrent": 2,
        # Optuna's stop-at-once rule (the default, pause, is tested below)
        "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3, "pause": False},
    })
    done = wait_sweep(client, sweep["id"])
    assert done["status"] == "succeeded", json.dumps(done)[:3000]
    pruned = [t for t in done["trials"] if t["stop_reason"] == "pruned"]
    assert pruned, done["trials"]
    for t in pruned:
        assert t["status"] == "succeeded"
        assert t["epochs_run"] < epochs and t["epochs_run"] in (1, 3)  # stopped at a rung
    assert done["counts"]["pruned"] == len(pruned)
    assert sum(t["epochs_run"] for t in done["trials"]) < 9 * epochs
    assert done["best_trial"]["stop_reason"] != "pruned"
    print("ASHA trials:", [(t["number"], t["epochs_run"], t["stop_reason"], round(t["value"], 3)) for t in done["trials"]])


def test_asha_with_pause_resumes_promoted_trials_from_their_snapshots(client: Client) -> None:
    """ASHA with promotions: trials pause at rungs (status paused, snapshot written) and the best
    third of each rung is resumed; a resumed trial's epochs continue where it paused (every epoch
    stored once, in order), and no trial is left paused when the sweep ends."""
    epochs = 9
    sweep = client.create_sweep({
        "name": "asha-pause", "base": base(epochs=epochs), "method": "random", "seed": 7,
        "parameters": {"optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 0.3}},
        "objective": {"metric": "val_accuracy", "mode": "max"}, "max_trials": 9, "max_concurrent": 2,
        "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3},
    })
    assert sweep["config"]["early_termination"]["pause"] is True  # asha's default
    done = wait_sweep(client, sweep["id"], timeout=240)
    assert done["status"] == "succeeded", json.dumps(done)[:3000]
    assert done["counts"]["paused"] == 0 and all(t["status"] == "succeeded" for t in done["trials"])
    jobs = {t["job_id"]: client.job(t["job_id"]) for t in done["trials"]}
    promoted = [j for j in jobs.values() if j["attempts"] > 1]  # claimed again after a pause
    assert promoted, [(j["trial_number"], j["attempts"], j["progress"]) for j in jobs.values()]
    for j in promoted:
        history = client.metrics(j["id"])
        assert [m["epoch"] for m in history] == list(range(1, j["progress"]["epoch"] + 1)), j["id"]
    # the first trial is not run in full just for being first (ASHA's rule, not Optuna's fallback)
    first = next(t for t in done["trials"] if t["number"] == 0)
    assert first["epochs_run"] < epochs or jobs[first["job_id"]]["attempts"] > 1
    pruned = [t for t in done["trials"] if t["stop_reason"] == "pruned"]
    assert pruned and all(t["epochs_run"] in (1, 3) for t in pruned)
    assert sum(t["epochs_run"] for t in done["trials"]) < 9 * epochs
    for t in pruned:  # a trial paused, then ended, keeps its best weights like any pruned trial
        data, digest = client.best_checkpoint(t["job_id"])
        assert data and hashlib.sha256(data).hexdigest() == digest
    best = done["best_trial"]
    assert best["stop_reason"] != "pruned" and best["epochs_run"] == epochs
    with pytest.raises(Exception):  # noqa: B017 - a paused-only field is refused for other types
        client.create_sweep({**{k: sweep["config"][k] for k in ("base", "parameters")}, "method": "random",
                             "objective": {"metric": "val_accuracy"}, "early_termination": {"type": "median", "pause": True}})
    print("ASHA+pause trials:", [(t["number"], t["epochs_run"], jobs[t["job_id"]]["attempts"], t["stop_reason"])
                                 for t in done["trials"]])


def test_tpe_suggestions_come_from_optuna(client: Client) -> None:
    seed, startup = 123, 2
    params = {"optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-4, "max": 0.1},
              "model.layers[0].units": {"values": [8, 16, 32]}}
    sweep = client.create_sweep({
        "name": "tpe", "base": base(epochs=2), "method": "tpe", "seed": seed, "n_startup_trials": startup,
        "parameters": params, "objective": {"metric": "val_accuracy", "mode": "max"},
        "max_trials": 4, "max_concurrent": 1,
    })
    done = wait_sweep(client, sweep["id"])
    assert done["status"] == "succeeded", json.dumps(done)[:3000]
    trials = done["trials"]
    dists = {"optimizer.learning_rate": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True),
             "model.layers[0].units": optuna.distributions.CategoricalDistribution([8, 16, 32])}

    def tpe_next(n: int, sign: float = 1.0) -> dict[str, Any]:
        """What Optuna's TPESampler proposes as trial n, told trials 0..n-1 with these results."""
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
            seed=sampler_seed(seed, n), n_startup_trials=startup, constant_liar=True))
        for t in trials[:n]:
            study.add_trial(optuna.trial.create_trial(params=t["params"], distributions=dists, value=sign * t["value"]))
        return study.ask(dists).params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for n in range(len(trials)):
        assert trials[n]["params"] == tpe_next(n), n
    # past the random start-up trials, TPE's proposals depend on the results it was told
    assert tpe_next(3, sign=-1.0) != trials[3]["params"]


def _post(client: Client, body: Any) -> Any:
    return client._http.post("/v1/sweeps", json=body)


def _paths(r: Any) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {e["path"]: e["msg"] for e in r.json()["errors"]}


def test_bad_sweeps_are_422s_naming_the_path(client: Client) -> None:
    ok = {"base": base(), "method": "random", "objective": {"metric": "val_accuracy"},
          "parameters": {"optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-4, "max": 0.1}}}

    def bad(**over: Any) -> dict[str, str]:
        return _paths(_post(client, {**copy.deepcopy(ok), **over}))

    p = bad(parameters={"optimizer.learning_rat": {"values": [0.1]}, "model.layers[5].units": {"values": [3]}})
    assert "no field 'learning_rat'" in p['parameters["optimizer.learning_rat"]']
    assert "2 item(s)" in p['parameters["model.layers[5].units"]']
    p = bad(parameters={"model.layers[0].units": {"values": [16, 0]}})
    assert list(p) == ['parameters["model.layers[0].units"].values[1]']
    assert "model.layers[0].units" in p['parameters["model.layers[0].units"].values[1]']
    p = bad(parameters={"model.layers[1].units": {"values": [10, 7]}})  # the head must give 10 classes
    assert "set units to 10" in p['parameters["model.layers[1].units"].values[1]']
    p = bad(parameters={"optimizer.learning_rate": {"distribution": "log_uniform", "min": 0, "max": 0.1}})
    assert "min > 0" in p['parameters["optimizer.learning_rate"]']
    p = bad(parameters={"optimizer.learning_rate": {"distribution": "uniform", "min": -1, "max": 0.1}})
    assert "greater than 0" in p['parameters["optimizer.learning_rate"].min']
    p = bad(method="grid", parameters={"model.layers[0].units": {"values": [8, 16]}}, max_trials=3)
    assert "2 point(s)" in p["max_trials"]
    p = bad(method="grid")
    assert "values" in p['parameters["optimizer.learning_rate"]']
    p = bad(objective={"metric": "val_accuracy"}, base=base(metrics=[]))
    assert "add it to the spec's metrics" in p["objective.metric"]
    p = bad(early_termination={"type": "asha", "min_epochs": 3})
    assert "less than the trials' epochs (3)" in p["early_termination.min_epochs"]
    p = bad(early_termination={"type": "sha"})
    assert "early_termination.type" in p
    p = bad(base=base(model={"layers": [{"type": "dense", "units": 0}]}))
    assert "base.model.layers[0].units" in p
    p = bad(parameters={"data.path": {"values": ["/etc/passwd"]}}, max_trials=0, typo=1)
    assert {"max_trials", "typo"} <= set(p)
    r = client._http.get("/v1/sweeps/0123456789abcdef0123456789abcdef")
    assert r.status_code == 404


def test_cancel_sweep(client: Client) -> None:
    sweep = client.create_sweep({
        "name": "cancel-me", "base": base(epochs=100_000), "method": "random", "seed": 1,
        "parameters": {"model.layers[0].units": {"distribution": "int_uniform", "min": 4, "max": 64}},
        "objective": {"metric": "val_loss"}, "max_trials": 5, "max_concurrent": 2,
    })
    assert sweep["objective"]["mode"] == "min"
    first = sweep["trials"][0]["job_id"]
    wait_status(client, first, ("running",), timeout=60)
    out = client.cancel_sweep(sweep["id"])
    assert out["status"] == "cancelled" and out["stop_reason"] == "cancelled"
    for t in out["trials"]:
        wait_status(client, t["job_id"], ("cancelled",), timeout=60)
    time.sleep(0.5)
    after = client.sweep(sweep["id"])
    assert after["status"] == "cancelled" and after["trials_created"] == 2  # no new trials
    assert isinstance(after["trials"][0]["params"]["model.layers[0].units"], int)
    r = client._http.post(f"/v1/sweeps/{sweep['id']}/cancel")
    assert r.status_code == 409


def test_lr_find_job_and_learning_rate_find(client: Client) -> None:
    finder = client.submit(base(kind="lr_find", lr_find={"steps": 60}))
    job = wait_status(client, finder["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    out = job["info"]["lr_find"]
    assert len(out["lrs"]) == len(out["losses"]) > 5
    assert out["suggested_learning_rate"] > 0 and out["rule"]
    trained = client.submit(base(optimizer={"name": "adam", "learning_rate": "find"}, epochs=5))
    job = wait_status(client, trained["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    info = job["info"]["lr_find"]
    assert info["suggested_learning_rate"] > 0 and info["rule"] and len(info["lrs"]) > 5
    metrics = client.metrics(trained["id"])
    assert len(metrics) == 5
    assert all(m["lr"] == pytest.approx(info["suggested_learning_rate"]) for m in metrics)


def test_cli_sweep_wait_shows_a_leaderboard(client: Client, tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from client.cli import app

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({
        "name": "cli", "base": base(epochs=2), "method": "grid", "objective": {"metric": "val_accuracy"},
        "parameters": {"model.layers[0].units": {"values": [8, 16]}},
    }))
    out = CliRunner().invoke(app, ["sweep", str(path), "--wait", "--url", client.url])
    assert out.exit_code == 0, out.output
    assert "succeeded" in out.output and "best: trial" in out.output and "val_accuracy" in out.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": base(), "method": "grid", "objective": {"metric": "val_accuracy"},
                               "parameters": {"model.layers[0].unit": {"values": [8]}}}))
    out = CliRunner().invoke(app, ["sweep", str(bad), "--url", client.url])
    assert out.exit_code == 2 and 'parameters["model.layers[0].unit"]' in out.output


def test_example_sweep_is_accepted(client: Client) -> None:
    body = json.loads((ROOT / "examples" / "sweep.json").read_text())
    sweep = client.create_sweep(body)
    try:
        assert sweep["method"] == "tpe" and sweep["max_trials"] == 30 and len(sweep["trials"]) == 4
        assert sweep["config"]["early_termination"]["max_epochs"] == 27
    finally:
        client.cancel_sweep(sweep["id"])


def test_a_sweep_whose_last_trial_ended_without_a_worker_is_advanced(inproc_env: dict[str, str]) -> None:
    """E.g. the reconciler failed its trial after its worker was lost on every attempt: the
    workers' sweep keeper advances it (here called directly, with no worker and no broker)."""
    import orchestration.sweeps as orchestration_sweeps
    from api.routers.sweeps import check_sweep
    from config.settings import get_settings
    from orchestration.sweeps import advance_stalled
    from store import repo
    from store import sweeps as store_sweeps
    from store.db import session_scope
    from store.models import DEFAULT_PROJECT

    settings = get_settings()
    body = {"name": "stalled", "base": base(), "method": "random", "seed": 5, "objective": {"metric": "val_loss"},
            "parameters": {"model.layers[0].units": {"values": [8, 16]}}, "max_trials": 2, "max_concurrent": 1}
    with session_scope() as s:
        config = check_sweep(body, s, DEFAULT_PROJECT, settings)
        sweep = store_sweeps.create_sweep(
            s, project_id=DEFAULT_PROJECT, name="stalled", method="random", config=config, objective_metric="val_loss",
            objective_mode="min", max_trials=2, max_concurrent=1,
        )
        first = orchestration_sweeps.advance_sweep(s, sweep.id, settings)
        sweep_id = sweep.id
    assert len(first) == 1
    sent: list[tuple[str, str]] = []
    assert sweep_id not in advance_stalled(settings, sent.extend)  # its trial is queued: not stalled
    for n in range(2):
        with session_scope() as s:
            job_id = store_sweeps.trials(s, sweep_id)[n].id
            repo.fail_unstarted_job(s, job_id, "lost on every attempt")
        assert sweep_id in advance_stalled(settings, sent.extend)
    assert len(sent) == 1 and sent[0][0] != first[0][0]  # the second trial, sent once
    with session_scope(write=False) as s:
        done = store_sweeps.get_sweep(s, sweep_id)
        assert done is not None and done.status == "failed" and done.trials_created == 2
        assert "no trial succeeded" in (done.error or "")
