"""``trainyard serve``: API + one worker + SQLite + the embedded SQLAlchemy broker, one command."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from safetensors.numpy import load as load_safetensors

from client import Client

from .helpers import ROOT, free_port, note_spec, wait_status


def test_serve_runs_a_job_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}" in first and "/docs" in first, first
        with Client(f"http://127.0.0.1:{port}") as c:
            job = c.submit(note_spec(4))
            done = wait_status(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
            assert done["status"] == "succeeded", done
            assert done["stop_reason"] in ("completed", "early_stopping")
            metrics = c.metrics(job["id"])
            assert len(metrics) == done["progress"]["epoch"] == 4
            vals = [m["val_loss"] for m in metrics]
            assert done["best"]["epoch"] == vals.index(min(vals)) + 1
            data, digest = c.best_checkpoint(job["id"])
            assert digest == hashlib.sha256(data).hexdigest()
            assert next(ck for ck in c.checkpoints(job["id"]) if ck["is_best"])["sha256"] == digest
            assert sorted(t.shape for t in load_safetensors(data).values()) == sorted([(64, 64), (64,), (10, 64), (10,)])
            assert c.ready()["broker"] == "ok"

            # a running job is cancelled through the embedded broker setup too
            long = c.submit(note_spec(100_000, name="long", callbacks={}))
            wait_status(c, long["id"], ("running",), timeout=60)
            c.cancel(long["id"])
            assert wait_status(c, long["id"], ("cancelled",), timeout=30)["stop_reason"] == "cancelled"

            # the embedded artifact store: data_dir/artifacts; deleting a job removes its files
            assert (data_dir / "artifacts" / "jobs" / job["id"] / "checkpoints" / f"{digest}.safetensors").is_file()
            c.delete(job["id"])
            assert not (data_dir / "artifacts" / "jobs" / job["id"]).exists()

        assert (data_dir / "trainyard.db").exists() and (data_dir / "broker.sqlite").exists()
        with sqlite3.connect(data_dir / "trainyard.db") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("SELECT status FROM jobs WHERE id = ?", (long["id"],)).fetchone()[0] == "cancelled"
            assert db.execute("SELECT count(*) FROM jobs WHERE id = ?", (job["id"],)).fetchone()[0] == 0  # deleted

        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2  # the API and the worker
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 < 30
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}"), f"child {pid} outlived serve"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_on_a_busy_port_says_so_and_exits_non_zero(tmp_path):
    import http.server
    import threading

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - another server that answers 200 to anything
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    port = other.server_address[1]
    threading.Thread(target=other.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = str(ROOT)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )
    finally:
        other.shutdown()
        other.server_close()
    assert out.returncode != 0, out.stdout + out.stderr
    assert "is running" not in out.stdout
    assert f"port {port} is in use" in out.stderr and "--port" in out.stderr


def test_the_embedded_broker_file_is_in_wal_mode_and_takes_messages(tmp_path):
    """``store.broker.prepare_embedded_broker`` (called by the API's dispatcher and the worker)
    puts the embedded broker's SQLite file in WAL mode (one fsync per message's commit instead of
    several); kombu's SQLAlchemy transport then stores and hands out messages from it as before."""
    import sqlite3

    from celery import Celery

    from orchestration.messages import send_jobs
    from store.broker import prepare_embedded_broker

    url = f"sqla+sqlite:///{tmp_path / 'data' / 'broker.sqlite'}"
    prepare_embedded_broker(url)
    prepare_embedded_broker(url)  # idempotent
    with sqlite3.connect(tmp_path / "data" / "broker.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    app = Celery("t", set_as_current=False)
    app.conf.update(broker_url=url, task_serializer="json", accept_content=["json"])
    send_jobs(app, [("a" * 32, "q1"), ("b" * 32, "q1")])
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("q1")
        got = [queue.get(timeout=5) for _ in range(2)]
        for m in got:
            m.ack()
        queue.close()
    assert [m.headers["argsrepr"] for m in got] == [repr(["a" * 32]), repr(["b" * 32])]
    prepare_embedded_broker("redis://127.0.0.1:6379/0")  # any other broker: nothing to do


def test_an_idle_worker_polls_the_embedded_broker_without_querying_until_its_file_changes(tmp_path, monkeypatch):
    """``worker.embedded_broker.QuietChannel`` (the worker's channel on the embedded broker) asks
    SQLite whether the broker's file changed since a queue was found empty (``PRAGMA
    data_version``) and skips the queue's query when it did not: an idle ``trainyard serve``
    worker took 8.75 % of a core polling every 0.05 s, 1.3 % every 0.02 s now. A message sent by
    another process is still found by the next poll, and one sent on this process's own
    connection too. An idle channel deletes the messages already delivered (kombu keeps them for
    good: the file grew ~1.4 KB a job), at its first idle poll and then every ``PRUNE_EVERY_S``;
    a message not yet delivered stays."""
    import sqlite3
    from queue import Empty

    from celery import Celery
    from kombu.transport import sqlalchemy as sqla_transport
    from sqlalchemy import event

    import worker.embedded_broker as embedded_broker
    from orchestration.messages import send_jobs
    from store.broker import prepare_embedded_broker
    from worker.embedded_broker import QuietChannel, use_quiet_polling

    # what the worker's app sets on kombu's class, undone after this test
    monkeypatch.setattr(sqla_transport.Transport, "Channel", sqla_transport.Transport.Channel)
    monkeypatch.setattr(sqla_transport.Transport, "polling_interval", sqla_transport.Transport.polling_interval)
    db = tmp_path / "broker.sqlite"
    url = f"sqla+sqlite:///{db}"
    prepare_embedded_broker(url)
    use_quiet_polling()
    app = Celery("t", set_as_current=False)
    app.conf.update(broker_url=url, task_serializer="json", accept_content=["json"])
    send_jobs(app, [("0" * 32, "q1")])  # the queue exists (kombu creates it in a commit of its own)

    def rows() -> list[tuple[str, int]]:
        """(queue, visible) of every message row in the file."""
        with sqlite3.connect(db) as con:
            return con.execute("SELECT q.name, m.visible FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id "
                               "ORDER BY m.id").fetchall()

    with app.connection_for_read() as conn:
        channel = conn.default_channel
        assert isinstance(channel, QuietChannel)
        statements: list[str] = []
        event.listen(channel.session.get_bind(), "before_cursor_execute",
                     lambda conn, cursor, sql, *rest: statements.append(sql))

        def get() -> str | None:
            try:
                return channel._get("q1")["headers"]["argsrepr"]
            except Empty:
                return None

        assert get() == repr(["0" * 32])
        assert rows() == [("q1", 0)]  # delivered: kombu keeps the row
        assert get() is None and any(sql.startswith("SELECT") for sql in statements)  # found empty by a query
        assert any(sql.startswith("DELETE") for sql in statements) and rows() == []  # the first idle poll prunes
        assert get() is None  # the prune changed the file: one more query
        statements.clear()
        for _ in range(5):
            assert get() is None
        assert statements == []  # nothing changed: no query
        script = ("import sys; from celery import Celery; from orchestration.messages import send_jobs; "
                  "app = Celery('t', set_as_current=False); "
                  "app.conf.update(broker_url=sys.argv[1], task_serializer='json', accept_content=['json']); "
                  "send_jobs(app, [('1' * 32, 'q1')])")
        subprocess.run([sys.executable, "-c", script, url], cwd=ROOT, check=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert get() == repr(["1" * 32])  # another process's commit: the next poll queries
        assert get() is None
        statements.clear()
        assert get() is None and statements == []
        send_jobs(app, [("2" * 32, "q1"), ("3" * 32, "q2")])  # this process, another connection of its own
        assert get() == repr(["2" * 32])
        assert get() is None
        assert rows() == [("q1", 0), ("q1", 0), ("q2", 1)]  # no prune within PRUNE_EVERY_S
        monkeypatch.setattr(embedded_broker, "PRUNE_EVERY_S", 0.0)
        monkeypatch.setattr(embedded_broker, "PRUNE_CHUNK", 1)  # at most one row a prune
        assert get() is None
        assert rows() == [("q1", 0), ("q2", 1)]
        monkeypatch.setattr(embedded_broker, "PRUNE_EVERY_S", 3600.0)
        assert get() is None  # a full chunk: the next idle poll goes on at once
        assert rows() == [("q2", 1)]  # the delivered ones deleted; the one not delivered stays
        assert get() is None and rows() == [("q2", 1)]


def test_the_embedded_broker_stores_one_sends_messages_together_or_none(tmp_path):
    """``orchestration.messages.send_jobs`` on the embedded broker stores all of one call's
    messages in one commit (kombu's transport commits each on its own: 27 messages took 56-71
    ms, 8-10 ms together), delivered in the order sent; when the broker's file cannot be written
    (another connection holds its write lock) nothing of the call is stored and the error is
    raised (the caller's outbox rows stay; its relay sends them again), and the next call stores
    all of them."""
    import sqlite3

    from celery import Celery
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    from orchestration.messages import send_jobs
    from store.broker import prepare_embedded_broker

    db = tmp_path / "broker.sqlite"
    url = f"sqla+sqlite:///{db}"
    prepare_embedded_broker(url)
    app = Celery("t", set_as_current=False)
    # a short busy timeout, so the locked write below fails in 0.2 s, not kombu's default 5 s
    app.conf.update(broker_url=url, task_serializer="json", accept_content=["json"],
                    broker_transport_options={"connect_args": {"timeout": 0.2}})
    send_jobs(app, [("0" * 32, "q1")])  # the queue exists now (kombu creates it in a commit of its own)
    commits = []
    with app.producer_or_acquire() as producer:
        event.listen(producer.channel.session.get_bind(), "commit", lambda conn: commits.append(1))
    ids = [f"{k:032d}" for k in range(1, 28)]
    send_jobs(app, [(i, "q1") for i in ids])
    assert len(commits) == 1

    lock = sqlite3.connect(db, timeout=0.2, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    with pytest.raises(OperationalError, match="locked"):
        send_jobs(app, [("a" * 32, "q1"), ("b" * 32, "q1")], max_retries=0)
    lock.execute("ROLLBACK")
    lock.close()
    send_jobs(app, [("c" * 32, "q1"), ("d" * 32, "q1")], max_retries=0)

    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("q1")
        got = []
        while True:
            try:
                m = queue.get(timeout=0.5)
            except queue.Empty:
                break
            m.ack()
            got.append(m.headers["argsrepr"])
        queue.close()
    assert got == [repr([i]) for i in ["0" * 32, *ids, "c" * 32, "d" * 32]]


def test_send_jobs_falls_back_to_kombus_own_put_when_storing_together_fails(tmp_path, caplog):
    """Should a kombu release change what storing the messages together relies on (here: the
    session's ``add_all`` raises, as an incompatible internal would), ``send_jobs`` stores them
    through kombu's own ``_put``, one by one, in order, and says so in a warning: the messages are
    sent, never lost to the change."""
    from celery import Celery

    from orchestration.messages import send_jobs
    from store.broker import prepare_embedded_broker

    url = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    prepare_embedded_broker(url)
    app = Celery("t", set_as_current=False)
    app.conf.update(broker_url=url, task_serializer="json", accept_content=["json"])
    ids = [f"{k:032d}" for k in range(3)]

    def changed(objects):
        raise TypeError("an internal that changed")

    with app.producer_or_acquire() as producer:
        session = producer.channel.session
    session.add_all = changed
    try:
        with caplog.at_level("WARNING", logger="trainyard.dispatch"):
            send_jobs(app, [(i, "q1") for i in ids])
    finally:
        del session.add_all
    assert "could not be stored together (TypeError: an internal that changed); storing them one by one" in caplog.text
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("q1")
        got = [queue.get(timeout=5) for _ in ids]
        for m in got:
            m.ack()
        queue.close()
    assert [m.headers["argsrepr"] for m in got] == [repr([i]) for i in ids]
