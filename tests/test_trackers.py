"""train.report_to: a short real run logs to TensorBoard, W&B (offline), MLflow (sqlite) and trackio (its local store)
at once, each read back from its own store with its own reader; a resumed run continues the same tracker runs without
logging a step twice, and `python -m train.eval` adds its figures to them; nothing reaches the network. A bad name, a
missing package and a store that breaks mid-run."""

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from aegis import metrics
from aegis.config import ConfigError, build
from aegis.config_checks import TRACKERS
from conftest import QUICKSTART, ROOT, train_cli

TOTAL = 16  # steps; the first session is stopped (Ctrl-C) after its third, with a checkpoint (save_steps 2) behind
STOP = 3  # it; a Ctrl-C that lands inside a tracker's store (MLflow caught one) must still stop the run (train/loop.py)
SETS = [
    f"schedule.total_steps={TOTAL}",
    "schedule.warmup_steps=1",
    "schedule.anneal_steps=4",
    "train.save_steps=2",
    "train.max_length=64",
    "train.report_to=" + ",".join(TRACKERS),
]
LOGGED = {"loss", "lr", "alpha", "gate", "ortho_error", "tokens_per_s", "grad_norm"}


class Listener:
    """A proxy that answers nothing and counts who tried it: every HTTP(S) client is pointed at it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.calls = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.calls += 1
            conn.close()


def wandb_records(path):
    """The records of a W&B run file (.wandb): its header, then 32 KiB blocks of length-prefixed chunks, each record
    one protobuf `Record` (wandb's own message class)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, part = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the block's padding
            pos += left
            continue
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def wandb_store(run_dir):
    """The run ids, step -> what was logged at it, and the config, from every W&B run file of the run."""
    ids, rows, config = set(), {}, {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):  # not latest-run, a link to the last
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                known = rows.setdefault(row.pop("_step"), {})
                assert not (known.keys() & row.keys() - {"_runtime", "_timestamp"}), f"W&B got a step twice: {row}"
                known.update(row)
    return ids, rows, config


def unique_steps(steps):
    assert len(steps) == len(set(steps)), f"a step logged twice: {sorted(steps)}"
    return set(steps)


def test_every_tracker_gets_the_run_and_a_resume_continues_it(tiny_path, tmp_path, monkeypatch):
    proxy = Listener()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub stays out of it (transformers asks it even for a local base)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run = tmp_path / "run"

    # the first session is stopped (Ctrl-C) after its third step; the resume starts again from its newest checkpoint
    cmd = [sys.executable, "-m", "train", "--config", str(QUICKSTART), "--run-dir", str(run), "--no-progress"]
    proc = subprocess.Popen(
        cmd + [a for s in SETS for a in ("--set", s)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and max((r["step"] for r in metrics.read(run)), default=0) < STOP:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0, "the run ended before it was stopped"
    stopped = max(r["step"] for r in metrics.read(run))
    assert STOP <= stopped < TOTAL
    first = json.loads((run / "trackers.json").read_text())
    out = train_cli(run, *SETS, resume=True)
    assert "resumed from" in out.stdout + out.stderr and "warning: train.report_to" not in out.stdout + out.stderr
    assert json.loads((run / "trackers.json").read_text()) == first  # the same tracker runs, continued
    report = tmp_path / "eval.json"
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.eval",
            "--checkpoint",
            str(run / "final"),
            "--data",
            "embedded:prose_eval.txt",
            "--out",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr
    evaluated = json.loads(report.read_text())["results"]["checkpoint"]["loss"]

    jsonl = {r["step"]: r for r in metrics.read(run)}
    assert sorted(jsonl) == list(range(1, TOTAL + 1))
    # every step but, at most, the one being logged when the run was stopped (after metrics.jsonl, before a tracker)
    allowed = [set(range(1, TOTAL + 1)), set(range(1, TOTAL + 1)) - {stopped}]

    def same_losses(series: dict):
        assert series.keys() in allowed, sorted(series)
        for step, loss in series.items():  # the resumed steps up to `stopped` are the first session's: same curve
            assert loss == pytest.approx(jsonl[step]["loss"], abs=1e-4), step

    # TensorBoard: the event files, through TensorBoard's own reader; the config as its hparams
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert LOGGED <= set(events.Tags()["scalars"])
    scalars = events.Scalars("loss")
    unique_steps([e.step for e in scalars])
    same_losses({e.step: e.value for e in scalars})
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("eval/checkpoint/loss")] == [
        (TOTAL, round(evaluated, 4))
    ]
    hparams = {}
    for sub in (run / "tensorboard").iterdir():
        if sub.is_dir() and list(sub.glob("events.*")):
            content = EventAccumulator(str(sub)).Reload().PluginTagToContent("hparams")
            for blob in content.values():
                info = plugin_data_pb2.HParamsPluginData.FromString(blob).session_start_info
                hparams.update({k: v.number_value or v.string_value for k, v in info.hparams.items()})
    assert hparams["train.lr"] == pytest.approx(2e-4) and hparams["model.base"] == "embedded"

    # W&B: one run id over both sessions' offline run files
    ids, rows, config = wandb_store(run)
    assert ids == {first["wandb"]["id"]}
    same_losses({step: row["loss"] for step, row in rows.items() if "loss" in row})
    assert rows[TOTAL]["eval/checkpoint/loss"] == pytest.approx(evaluated)
    assert config["train.lr"] == pytest.approx(2e-4) and config["train.report_to"] == ",".join(TRACKERS)

    # MLflow: one run in the sqlite store, through its client
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("aegis").experiment_id])
    assert [r.info.run_id for r in found] == [first["mlflow"]["run_id"]]
    history = client.get_metric_history(first["mlflow"]["run_id"], "loss")
    unique_steps([m.step for m in history])
    same_losses({m.step: m.value for m in history})
    assert [
        (m.step, round(m.value, 4))
        for m in client.get_metric_history(first["mlflow"]["run_id"], "eval/checkpoint/loss")
    ] == [(TOTAL, round(evaluated, 4))]
    assert LOGGED <= set(found[0].data.metrics) and found[0].data.params["schedule.total_steps"] == str(TOTAL)

    # trackio: one run in its local store (TRACKIO_DIR), read through trackio's storage class pointed at it
    from trackio import sqlite_storage
    from trackio.sqlite_storage import SQLiteStorage

    assert (tmp_path / "trackio" / SQLiteStorage.get_project_db_filename("aegis")).is_file()
    monkeypatch.setattr(sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")  # read once, at its first import
    assert SQLiteStorage.get_runs("aegis") == [first["trackio"]["name"]]
    logs = SQLiteStorage.get_logs("aegis", first["trackio"]["name"])
    unique_steps([row["step"] for row in logs if "loss" in row])
    same_losses({row["step"]: row["loss"] for row in logs if "loss" in row})
    assert [(row["step"], row["eval/checkpoint/loss"]) for row in logs if "eval/checkpoint/loss" in row] == [
        (TOTAL, pytest.approx(evaluated))
    ]
    assert SQLiteStorage.get_run_config("aegis", first["trackio"]["name"])["train.lr"] == pytest.approx(2e-4)

    assert proxy.calls == 0, "a tracker tried the network"


def test_a_bad_tracker_name_is_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        build({"train": {"report_to": ["tensorboard", "tensorbord"]}})
    assert str(e.value).count("\n") == 0
    assert "train.report_to: 'tensorbord' is not one of tensorboard, wandb, mlflow, trackio" in str(e.value)
    assert build({}).train.report_to == []  # no tracker unless asked


def test_a_tracker_that_is_not_installed_names_the_extra(tmp_path):
    """mlflow made unimportable (None in sys.modules, Python's mark for a blocked import): the command stops with
    one line before any model loads."""
    code = "import sys; sys.modules['mlflow'] = None; from train.__main__ import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--config",
            str(QUICKSTART),
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "train.report_to=mlflow",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: train.report_to: mlflow is not installed (pip install 'aegis-soul[trackers]')"


def test_a_tracker_whose_store_breaks_mid_run_warns_once(tmp_path, monkeypatch):
    """MLflow's sqlite store loses its metrics table after the first step: the sink warns once and goes quiet, the
    records still reach metrics.jsonl."""
    import sqlite3

    import mlflow

    from train import trackers

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cfg = build({"train": {"report_to": ["mlflow"]}})
    warnings = []
    try:
        logger = metrics.MetricLogger(
            [metrics.JsonlSink(tmp_path / "metrics.jsonl"), *trackers.start(cfg, tmp_path, warn=warnings.append)]
        )
        logger.log({"step": 1, "loss": 2.0, "phase": "chaos"})
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TABLE metrics")
        for step in (2, 3):
            logger.log({"step": step, "loss": 1.0})
        logger.close()
    finally:
        mlflow.end_run()
    assert len(warnings) == 1 and warnings[0].startswith("warning: train.report_to: mlflow failed at step 2 (")
    assert [r["step"] for r in metrics.read(tmp_path)] == [1, 2, 3]


def test_a_tracker_that_cannot_start_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """W&B online without an account: the library's own refusal, one line, by name, with the way out."""
    from train import trackers

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(trackers.TrackerError) as e:
        trackers.start(build({"train": {"report_to": ["wandb"]}}), tmp_path)
    assert str(e.value).startswith("train.report_to: wandb could not start: ") and "\n" not in str(e.value)
    assert str(e.value).endswith("(WANDB_MODE=offline logs without an account or a network)")
