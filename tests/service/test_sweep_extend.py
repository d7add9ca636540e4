"""POST /v1/sweeps/{id}/extend on the real stack: a finished TPE sweep raised from 3 to 5 trials
runs again, and its new trials are what Optuna's TPESampler proposes when told EVERY earlier trial
(checked against Optuna itself)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import optuna

from client import Client
from training.sweep_space import sampler_seed

from .test_sweeps import base, wait_sweep


def test_extend_a_finished_tpe_sweep_uses_every_prior_trial(client: Client) -> None:
    seed, startup = 321, 2
    params = {"optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-4, "max": 0.1}}
    sweep = client.create_sweep({
        "name": "tpe-extend", "base": base(epochs=2), "method": "tpe", "seed": seed, "n_startup_trials": startup,
        "parameters": params, "objective": {"metric": "val_accuracy", "mode": "max"},
        "max_trials": 3, "max_concurrent": 1,
    })
    first = wait_sweep(client, sweep["id"])
    assert first["status"] == "succeeded" and len(first["trials"]) == 3, json.dumps(first)[:2000]
    http = httpx.Client(base_url=client.url, timeout=30)
    assert http.post(f"/v1/sweeps/{sweep['id']}/extend", json={"max_trials": 3}).status_code == 409
    r = http.post(f"/v1/sweeps/{sweep['id']}/extend", json={"max_trials": 5})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running" and r.json()["max_trials"] == 5 and r.json()["trials_created"] == 4
    done = wait_sweep(client, sweep["id"])
    assert done["status"] == "succeeded" and done["max_trials"] == 5 and len(done["trials"]) == 5
    trials = sorted(done["trials"], key=lambda t: t["number"])
    assert [t["job_id"] for t in trials[:3]] == [t["job_id"] for t in sorted(first["trials"], key=lambda t: t["number"])]
    dists = {"optimizer.learning_rate": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)}

    def tpe_next(n: int) -> dict[str, Any]:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
            seed=sampler_seed(seed, n), n_startup_trials=startup, constant_liar=True))
        for t in trials[:n]:
            study.add_trial(optuna.trial.create_trial(params=t["params"], distributions=dists, value=t["value"]))
        return study.ask(dists).params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for n in (3, 4):  # the extension's trials: told trials 0..n-1, all of them
        assert trials[n]["params"] == tpe_next(n), n
    # a cancelled sweep cannot be extended
    other = client.create_sweep({**{k: v for k, v in sweep["config"].items() if k in ("base", "method", "parameters")},
                                 "name": "to-cancel", "objective": {"metric": "val_accuracy"}, "max_trials": 2})
    http.post(f"/v1/sweeps/{other['id']}/cancel")
    r = http.post(f"/v1/sweeps/{other['id']}/extend", json={"max_trials": 4})
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    assert http.post(f"/v1/sweeps/{'0' * 32}/extend", json={"max_trials": 4}).status_code == 404
    http.close()
