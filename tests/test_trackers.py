"""report_to: tensorboard, wandb, mlflow and trackio, offline, read back from what each stored.

One run stopped by SIGTERM at step 3, refused two --resumes (changed config, replaced data)
and resumed to step 6; one that raises at step 2; one killed (SIGKILL) in step 6 after
checkpoint 3 and resumed: all with all four trackers: wandb in offline mode (its .wandb files
parsed here), MLflow with its default file store in the run folder, trackio in a local
TRACKIO_DIR, TensorBoard's event files. Nothing goes online: every tracker's remote settings
are cleared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest

from test_train_sft import make_cfg, metrics, write_sft_data
from tiny import save_tiny_model
from tunesmith.config import load_config, save_config
from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import recipe, trackers
from tunesmith.train.methods import sft
from tunesmith.train.recipe import run

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]
ALLOW = "MLFLOW_ALLOW_FILE_STORE"  # set by the mlflow tracker for its run's lifetime only
ONLINE_SETTINGS = ["WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_BASE_URL",
                   "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE",
                   "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_DATASET_ID", "TRACKIO_BUCKET_ID"]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for name in ONLINE_SETTINGS:
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRACKIO_DIR", str(tmp_path_factory.mktemp("trackio")))  # read when trackio is imported
        home = tmp_path_factory.mktemp("tracker-home")  # wandb's settings and its service's debug logs
        mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
        mp.setenv("WANDB_CACHE_DIR", str(home / "cache"))
        yield mp


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-trackers"), layers=2, hidden=32)


def _cfg(tmp: Path, model_dir: Path, **over):
    over.setdefault("report_to", ALL)
    over.setdefault("train__max_steps", 6)
    over.setdefault("train__save_steps", 3)
    over.setdefault("train__eval_steps", 3)
    return make_cfg(tmp, model_dir, **over)


def _on_training_call(n: int, action):
    """SFT.loss that runs ``action`` on its n-th training call (step n: grad_accum 1)."""
    orig, calls = sft.SFT.loss, {"n": 0}

    def loss(self, module, batch):
        if module.training:
            calls["n"] += 1
            if calls["n"] == n:
                action()
        return orig(self, module, batch)
    return loss


def _ids(out: Path) -> dict:
    return json.loads((out / trackers.IDS_FILE).read_text())


# ---------------------------------------------------------------- reading back what each tracker stored


def _wandb_records(path: Path):
    """The records of a .wandb file: wandb's LevelDB-log framing (7-byte ':W&B' header, 32 KiB
    blocks, chunks with a crc32/length/type header) around protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            r = pb.Record()
            r.ParseFromString(pending)
            yield r


def _wandb_segments(out: Path, run_id: str) -> list[dict]:
    """Each start's offline folder, in time order: its history triples, config, saved files, exit."""
    segs = []
    for d in sorted((out / "wandb").glob(f"offline-run-*-{run_id}")):
        seg = {"dir": d, "triples": [], "config": {}, "exit": None, "files": [], "preempting": False}
        for r in _wandb_records(d / f"run-{run_id}.wandb"):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                row = {(i.key or i.nested_key[0]): json.loads(i.value_json) for i in r.history.item}
                seg["triples"] += [(k, row["_step"], v) for k, v in row.items() if not k.startswith("_")]
            elif kind == "run":
                seg["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update}
            elif kind == "files":
                seg["files"] += [f.path for f in r.files.files]
            elif kind == "preempting":
                seg["preempting"] = True
            elif kind == "exit":
                seg["exit"] = r.exit.exit_code
        segs.append(seg)
    return segs


@mock.patch.dict(os.environ, {ALLOW: "true"})  # reading the file store back, here only
def _mlflow(ident: dict) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ident["tracking_uri"])
    r = client.get_run(ident["run_id"])
    triples = [(k, m.step, m.value) for k in r.data.metrics for m in client.get_metric_history(r.info.run_id, k)]
    artifacts = {}
    for a in client.list_artifacts(r.info.run_id):
        artifacts[a.path] = json.loads(Path(client.download_artifacts(r.info.run_id, a.path)).read_text())
    runs = client.search_runs([r.info.experiment_id])
    return {"status": r.info.status, "params": r.data.params, "tags": r.data.tags, "triples": triples,
            "artifacts": artifacts, "runs": [x.info.run_id for x in runs]}


def _trackio(ident: dict) -> dict:
    from trackio import cas
    from trackio.sqlite_storage import SQLiteStorage as S

    project = ident["project"]
    logs = S.get_logs(project, run_id=ident["id"])
    triples = [(k, row["step"], v) for row in logs for k, v in row.items() if k not in ("step", "timestamp")]
    manifests = []
    for a in sorted(S.get_run_artifacts(project, ident["name"], ident["id"])["output"], key=lambda a: a["version"]):
        m = S.get_artifact_manifest(project, a["name"], f"v{a['version']}")
        manifests.append(json.loads(cas.blob_path(project, m["manifest"][0]["digest"]).read_text()))
    return {"triples": triples, "config": S.get_run_config(project, run_id=ident["id"]),
            "alerts": S.get_alerts(project, run_id=ident["id"]), "runs": S.get_run_records(project),
            "run_json": manifests}


def _tensorboard(out: Path) -> list[tuple]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return [(tag, e.step, e.value) for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)], ea.Tags()["tensors"]


def _expected(out: Path) -> list[tuple]:
    """metrics.jsonl as (name, step, value): every finite number but the step."""
    return [(k, r["step"], v) for r in metrics(out) for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and v == v]


def _snapshot(out: Path) -> dict:
    ids = _ids(out)
    run_json = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else None
    return {"ids": ids, "run_json": run_json, "expected": _expected(out),
            "wandb": _wandb_segments(out, ids["wandb"]["id"]), "mlflow": _mlflow(ids["mlflow"]),
            "trackio": _trackio(ids["trackio"]), "tensorboard": _tensorboard(out)}


def _files(folder: Path) -> list[tuple]:
    return sorted((p.relative_to(folder), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def _as_left(out: Path) -> dict:
    """What a refused --resume must leave as it was: every tracker's run, trackers.json,
    metrics.jsonl, the wandb offline folders and TensorBoard's event files."""
    s = _snapshot(out)
    return {"ids": (out / trackers.IDS_FILE).read_text(), "metrics": (out / "metrics.jsonl").read_text(),
            "mlflow": {k: s["mlflow"][k] for k in ("status", "params", "tags", "triples", "runs")},
            "wandb": _files(out / "wandb"), "trackio": {k: s["trackio"][k] for k in ("triples", "alerts", "runs")},
            "tensorboard": _files(out / "tensorboard")}


# ---------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def resumed(offline, model_dir, tmp_path_factory):
    """SIGTERM during step 3 (checkpoint-3 saved, stopped); a --resume with a changed
    training key, and one with the training data replaced, both refused; then --resume to
    step 6."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = _cfg(tmp, model_dir)
    out = Path(cfg.output_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft.SFT, "loss", _on_training_call(3, lambda: os.kill(os.getpid(), signal.SIGTERM)))
        first = run(cfg)
    assert first["stopped_by_signal"] and first["steps"] == 3
    assert ALLOW not in os.environ
    stopped, left = _snapshot(out), [_as_left(out)]
    changed = _cfg(tmp, model_dir, train__learning_rate=1e-3)  # same folder, same data written again
    with pytest.raises(TunesmithError, match=r"^--resume: the config changed since checkpoint-3 in keys that alter "
                                             r"training \(train.learning_rate\)"):
        run(changed, resume=True)
    left.append(_as_left(out))
    data = Path(cfg.data.train)
    original = data.read_bytes()
    write_sft_data(data, seed=1)
    with pytest.raises(TunesmithError, match=rf"^--resume: what training reads changed since checkpoint-3: "
                                             rf"data file {data}"):
        run(cfg, resume=True)
    data.write_bytes(original)
    left.append(_as_left(out))
    final = run(cfg, resume=True)
    assert final["steps"] == 6 and (out / "final").exists()
    assert ALLOW not in os.environ
    return {"out": out, "cfg": cfg, "stopped": stopped, "left": left, "final": _snapshot(out)}


@pytest.fixture(scope="module")
def failed(offline, model_dir, tmp_path_factory):
    """A run that raises during step 2."""
    tmp = tmp_path_factory.mktemp("failed")
    cfg = _cfg(tmp, model_dir)
    out = Path(cfg.output_dir)
    boom = RuntimeError("boom in step 2")

    def fail():
        raise boom
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft.SFT, "loss", _on_training_call(2, fail))
        with pytest.raises(RuntimeError) as caught:
            run(cfg)
    assert ALLOW not in os.environ
    ids = _ids(out)
    return {"out": out, "raised": caught.value, "boom": boom, "ids": ids, "expected": _expected(out),
            "wandb": _wandb_segments(out, ids["wandb"]["id"]), "mlflow": _mlflow(ids["mlflow"]),
            "trackio": _trackio(ids["trackio"])}


# ---------------------------------------------------------------- the metrics


def test_every_tracker_holds_exactly_the_metrics_of_metrics_jsonl(resumed):
    s = resumed["final"]
    want = Counter(s["expected"])
    assert {k for k, _, _ in want} >= {"loss", "learning_rate", "grad_norm", "eval_loss", "epoch",
                                       "tokens_per_second", "trained_tokens_per_second"}
    assert Counter(t for seg in s["wandb"] for t in seg["triples"]) == want
    assert Counter(s["mlflow"]["triples"]) == want
    assert Counter(s["trackio"]["triples"]) == want
    tb, _ = s["tensorboard"]  # float32 there
    assert sorted((k, st) for k, st, _ in tb) == sorted((k, st) for k, st, _ in want)
    got = {(k, st): v for k, st, v in tb}
    assert all(got[k, st] == pytest.approx(v, rel=1e-6) for k, st, v in want)


def test_resume_continues_the_same_tracker_runs_from_the_resume_step(resumed):
    stopped, final = resumed["stopped"], resumed["final"]
    assert stopped["ids"] == final["ids"] == final["run_json"]["trackers"]
    assert stopped["run_json"]["trackers"] == stopped["ids"]
    # wandb offline: one folder per start, both under the one run id, steps 1-3 then 4-6
    segs = final["wandb"]
    assert len(segs) == 2 and segs[0]["dir"] == stopped["wandb"][0]["dir"]
    assert [sorted(st for k, st, _ in seg["triples"] if k == "loss") for seg in segs] == [[1, 2, 3], [4, 5, 6]]
    # mlflow and trackio: one run, each step once
    assert final["mlflow"]["runs"] == [final["ids"]["mlflow"]["run_id"]]
    assert sorted(st for k, st, _ in final["mlflow"]["triples"] if k == "loss") == [1, 2, 3, 4, 5, 6]
    assert [r["id"] for r in final["trackio"]["runs"]] == [final["ids"]["trackio"]["id"]]
    assert sorted(st for k, st, _ in final["trackio"]["triples"] if k == "loss") == [1, 2, 3, 4, 5, 6]
    # the default places: in the run folder (trackio: its own TRACKIO_DIR)
    out = resumed["out"]
    assert final["ids"]["mlflow"]["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    assert segs[0]["dir"].parent == out / "wandb"
    assert final["ids"]["trackio"]["dir"] == os.environ["TRACKIO_DIR"]


def test_a_signal_stop_ends_the_runs_as_stopped_and_the_resumed_run_as_finished(resumed):
    stopped, final = resumed["stopped"], resumed["final"]
    assert stopped["mlflow"]["status"] == "KILLED" and stopped["mlflow"]["tags"]["tunesmith.stopped_by"] == "SIGTERM"
    assert final["mlflow"]["status"] == "FINISHED"
    first, second = final["wandb"]
    assert first["preempting"] and first["exit"] == 128 + signal.SIGTERM
    assert not second["preempting"] and second["exit"] == 0
    assert [(a["level"], a["title"]) for a in final["trackio"]["alerts"]] == [("warn", "training stopped by SIGTERM")]


def test_a_refused_resume_leaves_the_stopped_tracker_runs_as_they_were(resumed):
    """The resume checks run before any tracker run is continued: nothing is reopened,
    nothing marked failed."""
    before, *refused = resumed["left"]
    assert len(refused) == 2 and all(r == before for r in refused)
    stopped = resumed["stopped"]
    assert before["mlflow"]["status"] == "KILLED" and len(stopped["wandb"]) == 1
    assert stopped["wandb"][0]["preempting"] and [a["level"] for a in stopped["trackio"]["alerts"]] == ["warn"]


def test_config_and_run_json_are_attached(resumed):
    final, cfg = resumed["final"], resumed["cfg"].to_dict()
    run_json = final["run_json"]
    assert run_json["steps"] == 6 and not run_json["stopped_by_signal"]
    # wandb: the config, and run.json as a run file (a copy, not a link to the rewritten one)
    for seg in final["wandb"]:
        assert seg["config"]["train"] == cfg["train"] and seg["config"]["report_to"] == ALL
        assert "run.json" in seg["files"] and not (seg["dir"] / "files" / "run.json").is_symlink()
    segs = final["wandb"]
    assert json.loads((segs[0]["dir"] / "files" / "run.json").read_text())["steps"] == 3
    assert json.loads((segs[1]["dir"] / "files" / "run.json").read_text()) == run_json
    # mlflow: flat params, config.json and run.json artifacts
    ml = final["mlflow"]
    assert ml["params"]["train.learning_rate"] == "0.005" and ml["params"]["lora.r"] == "4"
    assert ml["params"]["report_to"] == json.dumps(ALL)
    assert ml["artifacts"] == {"config.json": cfg, "run.json": run_json}
    # trackio: the config, and run.json as an artifact version per start
    tk = final["trackio"]
    assert tk["config"]["train"] == cfg["train"]
    assert [m["steps"] for m in tk["run_json"]] == [3, 6] and tk["run_json"][-1] == run_json
    # tensorboard: text summaries
    _, texts = final["tensorboard"]
    assert {"config/text_summary", "run.json/text_summary"} <= set(texts)


# ---------------------------------------------------------------- a crash between checkpoints

KILL_IN_STEP = textwrap.dedent("""
    # `tunesmith train CFG` that kills itself (SIGKILL) in training step argv[1]'s forward,
    # a moment after the step before it was logged (trackio writes from a thread every 0.5 s)
    import os, signal, sys, time
    from tunesmith.train.methods import sft
    n, calls, loss = int(sys.argv[1]), [0], sft.SFT.loss
    def loss_(self, module, batch):
        if module.training:
            calls[0] += 1
            if calls[0] == n:
                time.sleep(2)
                os.kill(os.getpid(), signal.SIGKILL)
        return loss(self, module, batch)
    sft.SFT.loss = loss_
    from tunesmith.cli import main
    main(["train", sys.argv[2]])
""")


def _pairs(triples) -> Counter:
    return Counter((k, st) for k, st, _ in triples)


@pytest.fixture(scope="module")
def crashed(offline, model_dir, tmp_path_factory):
    """Killed (SIGKILL) in step 6, the last checkpoint at step 3: steps 4-5 and the eval at
    step 4 reached the trackers; then --resume, which replays steps 4-5."""
    tmp = tmp_path_factory.mktemp("crashed")
    cfg = _cfg(tmp, model_dir, train__eval_steps=2)
    out = Path(cfg.output_dir)
    save_config(cfg, tmp / "cfg.yaml")
    (tmp / "kill.py").write_text(KILL_IN_STEP)
    # its own wandb service, as a separate `tunesmith train` has (not the one wandb started for this process)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    p = subprocess.run([sys.executable, str(tmp / "kill.py"), "6", str(tmp / "cfg.yaml")], capture_output=True,
                       text=True, timeout=300, env={**env, "PYTHONPATH": str(Path(__file__).parent)})
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert [c.name for c in ckpt.find_checkpoints(out)[0]] == ["checkpoint-3"]
    killed = _snapshot(out)
    final = run(cfg, resume=True)
    assert final["steps"] == 6
    return {"out": out, "killed": killed, "final": _snapshot(out)}


def test_a_crash_resume_sends_no_tracker_a_step_it_already_holds(crashed):
    killed, final = crashed["killed"], crashed["final"]
    # what the crash left: steps 1-5 (and the evals at 0, 2, 4) already in MLflow and trackio
    for held in (killed["mlflow"]["triples"], killed["trackio"]["triples"]):
        assert sorted(st for k, st in _pairs(held) if k == "loss") == [1, 2, 3, 4, 5]
        assert sorted(st for k, st in _pairs(held) if k == "eval_loss") == [0, 2, 4]
    assert killed["mlflow"]["status"] == "RUNNING" and killed["run_json"] is None
    # after the resume: every (metric, step) of metrics.jsonl once, the replayed ones as first logged
    want = _pairs(final["expected"])
    assert set(want.values()) == {1} and sorted(st for k, st in want if k == "loss") == [1, 2, 3, 4, 5, 6]
    assert _pairs(final["mlflow"]["triples"]) == want and _pairs(final["trackio"]["triples"]) == want
    tb, _ = final["tensorboard"]  # replayed from step 4: the earlier event files' 4 and 5 are purged
    assert _pairs(tb) == want
    loss = {st: v for k, st, v in final["expected"] if k == "loss"}  # the replay is bit-identical
    for got in (final["mlflow"]["triples"], final["trackio"]["triples"]):
        assert {st: v for k, st, v in got if k == "loss"} == loss
    assert final["mlflow"]["status"] == "FINISHED" and final["mlflow"]["runs"] == [final["ids"]["mlflow"]["run_id"]]
    tk = final["ids"]["trackio"]  # one trackio project for this module's runs: this one's record, once
    assert [r["id"] for r in final["trackio"]["runs"] if r.get("name") == tk["name"]] == [tk["id"]]
    # wandb offline cannot know what the crashed start's folder holds (what wandb had written
    # of it when killed; in a run this short, none of its history): the resumed start's
    # folder holds every step from the checkpoint on (as the README says)
    first, second = final["wandb"]
    assert first["exit"] is None and second["exit"] == 0
    assert {st for k, st in _pairs(first["triples"]) if k == "loss"} <= {1, 2, 3, 4, 5}
    assert sorted(st for k, st in _pairs(second["triples"]) if k == "loss") == [4, 5, 6]


def test_wandb_online_is_not_sent_the_steps_before_its_resumed_run_continues(offline, tmp_path, monkeypatch):
    """Online, a resumed wandb run continues at the step after its last (run.starting_step)
    and drops a log() below it: those steps are not sent (no network here: a stand-in run)."""
    import wandb

    logged = []

    class Run:
        id, dir, starting_step = "abc123", str(tmp_path / "wandb" / "run-abc123" / "files"), 6

        def log(self, metrics, step):
            logged.append((step, sorted(metrics)))
    inits = []
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or Run())
    (tmp_path / trackers.IDS_FILE).write_text(json.dumps({"wandb": {"id": "abc123", "project": "p"}}))
    tracked = trackers.Trackers(["wandb"], tmp_path, {"train": {}}, resumed=True)
    tracked.start(3)
    for step in (4, 5, 6, 7):
        tracked.log({"step": step, "loss": 1.0})
    assert inits[0]["id"] == "abc123" and inits[0]["resume"] == "allow"
    assert logged == [(6, ["loss"]), (7, ["loss"])]


# ---------------------------------------------------------------- MLflow's file store allowed for the run only


def test_mlflow_allows_its_file_store_for_the_runs_lifetime_only(offline, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    assert ALLOW not in os.environ
    t = trackers.MLflow()
    t.start(tmp_path, {"a": 1}, "x", None)
    assert os.environ[ALLOW] == "true"
    t.finish(trackers.FINISHED, None, None, None)
    assert ALLOW not in os.environ

    def boom(*a, **k):
        raise RuntimeError("store gone")
    with monkeypatch.context() as mp:  # a start that fails
        mp.setattr(MlflowClient, "create_run", boom)
        with pytest.raises(RuntimeError, match="store gone"):
            trackers.MLflow().start(tmp_path, {"a": 1}, "x", None)
    assert ALLOW not in os.environ
    t = trackers.MLflow()
    t.start(tmp_path, {"a": 1}, "x", None)
    with monkeypatch.context() as mp:  # a finish that fails
        mp.setattr(MlflowClient, "set_terminated", boom)
        with pytest.raises(RuntimeError, match="store gone"):
            t.finish(trackers.FAILED, None, None, "boom")
    assert ALLOW not in os.environ
    monkeypatch.setenv(ALLOW, "true")  # the user's own setting stays
    t = trackers.MLflow()
    t.start(tmp_path, {"a": 1}, "x", None)
    t.finish(trackers.FINISHED, None, None, None)
    assert os.environ[ALLOW] == "true"


# ---------------------------------------------------------------- failure


def test_a_run_that_raises_is_marked_failed_and_the_exception_goes_on_unchanged(failed):
    assert failed["raised"] is failed["boom"]
    assert not (failed["out"] / "run.json").exists()
    assert sorted(st for k, st, _ in failed["expected"] if k == "loss") == [1]  # step 1 logged, step 2 raised
    ml = failed["mlflow"]
    assert ml["status"] == "FAILED" and "boom in step 2" in ml["tags"]["tunesmith.error"]
    assert Counter(ml["triples"]) == Counter(failed["expected"])
    (seg,) = failed["wandb"]
    assert seg["exit"] == 1 and Counter(seg["triples"]) == Counter(failed["expected"])
    alerts = failed["trackio"]["alerts"]
    assert [(a["level"], a["title"]) for a in alerts] == [("error", "training failed")]
    assert "RuntimeError: boom in step 2" in alerts[0]["text"]


def test_a_tracker_that_cannot_start_is_one_sentence_before_training_and_the_others_end_failed(
        offline, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchstore://nowhere")  # no store for the scheme: no network
    cfg = _cfg(tmp_path, model_dir, report_to=["wandb", "mlflow"])
    out = Path(cfg.output_dir)
    with pytest.raises(TunesmithError) as e:
        run(cfg)
    msg = str(e.value)
    assert msg.startswith("report_to mlflow: the tracker could not start a run (") and "\n" not in msg
    assert msg.endswith("check MLFLOW_TRACKING_URI, or remove mlflow from report_to")
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))
    (wb,) = list((out / "wandb").glob("offline-run-*"))
    (seg,) = _wandb_segments(out, wb.name.rsplit("-", 1)[1])
    assert seg["exit"] == 1 and seg["triples"] == []


def test_a_tracker_failing_while_logging_is_reported_once_and_training_goes_on(
        offline, model_dir, tmp_path, monkeypatch):
    from tunesmith import console

    calls = []

    def broken(self, metrics, step):
        calls.append(step)
        if len(calls) > 1:
            raise OSError("disk quota exceeded")
        orig(self, metrics, step)
    orig = trackers.TensorBoard.log
    monkeypatch.setattr(trackers.TensorBoard, "log", broken)
    warnings = []
    monkeypatch.setattr(console, "warn", warnings.append)
    cfg = _cfg(tmp_path, model_dir, report_to=["tensorboard"], train__eval_steps=0)
    manifest = run(cfg)
    assert manifest["steps"] == 6 and (Path(cfg.output_dir) / "final").exists()
    assert calls == [1, 2]  # dropped after its failure
    assert [w for w in warnings if "tensorboard" in w] == [
        "report_to tensorboard: logging failed (OSError: disk quota exceeded); tensorboard gets no more metrics "
        "from this run, training goes on"]
    assert len(metrics(Path(cfg.output_dir))) == 7  # steps 1-6 and the final eval


# ---------------------------------------------------------------- refusals before any weights load


def test_a_tracker_that_is_not_installed_is_refused_in_one_sentence_before_weights_load(
        tmp_path, model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("wandb", "trackio") else real(name, *a, **k))

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the tracker check")
    monkeypatch.setattr(recipe, "build_model", no_weights)
    monkeypatch.setattr(recipe, "load_tokenizer", no_weights)
    with pytest.raises(TunesmithError) as e:
        run(_cfg(tmp_path, model_dir, report_to=["mlflow", "wandb", "trackio"]))
    assert str(e.value) == ("report_to: wandb and trackio need the wandb trackio packages, not installed; "
                            "`pip install wandb trackio` (or `pip install 'tunesmith[trackers]'`), or remove wandb "
                            "and trackio from report_to")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "tensorboard" else real(name, *a, **k))
    with pytest.raises(TunesmithError, match=r"report_to: tensorboard needs the tensorboard package, not installed; "
                                             r"`pip install tensorboard`"):
        run(_cfg(tmp_path, model_dir, report_to=["tensorboard"]))


def test_report_to_takes_any_subset_and_refuses_others(tmp_path, model_dir):
    raw = {"data": {"train": "x.jsonl"}}
    assert load_config(None, raw={**raw, "report_to": "wandb"}).report_to == ["wandb"]
    assert load_config(None, raw={**raw, "report_to": ["mlflow", "trackio"]}).report_to == ["mlflow", "trackio"]
    assert load_config(None, raw={**raw, "report_to": "none"}).report_to == []
    with pytest.raises(TunesmithError, match="report_to"):
        load_config(None, raw={**raw, "report_to": ["neptune"]})


def test_flatten_gives_mlflow_param_names():
    assert trackers.flatten({"train": {"learning_rate": 1e-4, "seed": 0}, "report_to": ["wandb"],
                             "data": {"columns": {"q:uestion": "prompt"}, "eval": None}}) == {
        "train.learning_rate": "0.0001", "train.seed": "0", "report_to": '["wandb"]',
        "data.columns": '{"q:uestion": "prompt"}', "data.eval": "None"}
