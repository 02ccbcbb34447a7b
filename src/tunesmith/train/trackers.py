"""Experiment trackers for a training run: ``report_to: [tensorboard, wandb, mlflow, trackio]``.

Each tracker gets what ``metrics.jsonl`` gets, under the same names (``loss``,
``learning_rate``, ``grad_norm``, ``eval_loss``, ``tokens_per_second``...) at the same
``step``; a null (a NaN in the log) is left out. The run config is attached at the start
and ``run.json`` at the end, each as the tracker expects it.

Our own thin adapters on each library's public API, not transformers' ``report_to``
integrations: those are ``TrainerCallback``s of ``transformers.Trainer``, and the engine is
our own loop (``train/engine.py``), so nothing would ever call them.

One run folder is one tracker run. The ids a tracker gave the run at its first start are
kept in ``OUTPUT_DIR/trackers.json`` (and in ``run.json``), and ``--resume`` continues
those runs rather than opening new ones. The runs start (continue) only once training can
begin: ``fit`` calls ``Trackers.start`` after a resume's checks passed and its checkpoint
loaded, before step 1, so a refused ``--resume`` (no complete checkpoint, changed config or
inputs) leaves the previous runs exactly as they were. A run that raises after that is
marked failed; one stopped by SIGTERM/SIGINT (checkpoint saved) ends as stopped, not finished.

After a crash (SIGKILL, power loss) between checkpoints, ``--resume`` replays the steps after
the last checkpoint (bit-identically) and metrics.jsonl drops and rewrites them. A tracker
is not sent again what its run already holds: MLflow (each metric's history) and trackio
(its local database) skip a metric at a step at or below the last step they hold for that
metric, wandb online skips steps below the step its resumed run continues at
(``run.starting_step``; wandb itself would drop them), and TensorBoard hides the earlier
event files' points from the first replayed step on (``purge_step``) and gets them again.
The points kept are the first ones: equal for the deterministic metrics (``loss``,
``eval_loss``...), from the first pass for timings, and from before the change under
``--force-resume``. wandb offline cannot know: each start writes its own folder; the resumed
start's holds every step from the checkpoint on, the crashed start's what wandb had written
of its buffer when killed, so a replayed step may be in both. Where the data goes:

- tensorboard: ``OUTPUT_DIR/tensorboard``;
- wandb: ``OUTPUT_DIR/wandb`` (or ``WANDB_DIR``); ``WANDB_MODE``, ``WANDB_PROJECT`` (default
  ``tunesmith``), ``WANDB_ENTITY`` as wandb reads them;
- mlflow: ``MLFLOW_TRACKING_URI``, default a file store ``OUTPUT_DIR/mlruns``; experiment
  ``MLFLOW_EXPERIMENT_NAME`` (default ``tunesmith``);
- trackio: trackio's own local database (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``),
  project ``tunesmith``, where ``trackio show`` finds it.

A tracker that is not installed is refused before any weights load (``check_installed``),
one that cannot start is refused before training, and one that fails while logging is
reported once and dropped: training goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from tunesmith import console
from tunesmith.errors import TunesmithError, describe, one_line
from tunesmith.files import dumps, write_text_atomic

IDS_FILE = "trackers.json"
PROJECT = "tunesmith"  # wandb project, mlflow experiment and trackio project unless the environment names one
FINISHED, FAILED, STOPPED = "finished", "failed", "stopped"


@contextlib.contextmanager
def _quiet_stdout():
    """Tracker libraries that print to stdout print to stderr instead: stdout stays for
    machine-readable output, as everywhere in tunesmith (``console.py``)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---------------------------------------------------------------- the adapters


class Tracker:
    """One tracker's run. ``start`` returns what identifies the run (stored in
    ``trackers.json``); ``previous`` is that from the run's earlier start, on --resume.

    What a continued run already holds, found by ``start``: ``held[name]`` the last step
    of metric ``name``, ``held_all`` the last step of every metric (-1: none)."""

    name = ""
    package = ""   # the import name find_spec looks for; also what `pip install` takes
    hint = ""      # how to fix a run that cannot start
    held: dict[str, int] = {}  # replaced by start, never mutated
    held_all = -1

    def holds(self, metric: str, step: int) -> bool:
        """Whether the run already has ``metric`` at ``step`` (logged before a crash, and
        now replayed from the checkpoint)."""
        return step <= max(self.held_all, self.held.get(metric, -1))

    def last_held(self) -> int:
        return max([self.held_all, *self.held.values()])

    def start(self, out: Path, config: dict, run_name: str, previous: dict | None) -> dict:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, status: str, run_json: dict | None, signal_name: str | None, error: str | None) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    name = package = "tensorboard"
    hint = "check that OUTPUT_DIR/tensorboard is writable"

    def start(self, out, config, run_name, previous):
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls, self.dir, self.config = SummaryWriter, out / "tensorboard", config
        self.resumed, self.writer, self.last_step = previous is not None, None, 0
        return {"dir": str(self.dir)}

    def log(self, metrics, step):
        if self.writer is None:
            # Opened at the first record: TensorBoard hides the earlier event files' points
            # at steps >= purge_step, i.e. on --resume the steps logged after the checkpoint
            # that are now replayed, and on a fresh start in a used folder all of them (as
            # metrics.jsonl starts again).
            self.writer = self._writer_cls(str(self.dir), purge_step=step if self.resumed else 0)
            self.writer.add_text("config", _markdown_json(self.config), step)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.last_step = step

    def finish(self, status, run_json, signal_name, error):
        if self.writer is None:
            return
        if run_json is not None:
            self.writer.add_text("run.json", _markdown_json(run_json), self.last_step)
        if error is not None:
            self.writer.add_text("error", error, self.last_step)
        self.writer.close()


def _markdown_json(obj: dict) -> str:
    """TensorBoard's text plugin renders markdown: four-space indent keeps JSON verbatim."""
    return "\n".join("    " + line for line in dumps(obj, indent=2).splitlines())


class Wandb(Tracker):
    name = package = "wandb"
    hint = "log in with `wandb login`, or set WANDB_MODE=offline"

    def start(self, out, config, run_name, previous):
        import wandb

        project = os.environ.get("WANDB_PROJECT") or (previous or {}).get("project") or PROJECT
        with _quiet_stdout():
            self.run = wandb.init(
                project=project, dir=os.environ.get("WANDB_DIR") or str(out), name=run_name, config=config,
                id=(previous or {}).get("id"), resume="allow" if previous else None,
                allow_val_change=previous is not None,  # report_to, save/eval steps may change on --resume
                reinit="create_new")  # beside any run the caller has open, which it leaves alone
        # Offline (WANDB_MODE=offline), each start writes its own offline-run-*-ID folder in
        # `dir` under the same run id: wandb does not resume offline runs locally, and its
        # starting step stays 0. Online, a resumed run continues at the step after its last
        # one; wandb drops a log() below it, so those steps are not sent.
        if previous is not None and self.run.starting_step > 0:
            self.held_all = self.run.starting_step - 1
        return {"id": self.run.id, "project": project, "dir": str(Path(self.run.dir).parent.parent)}

    def log(self, metrics, step):
        self.run.log(metrics, step=step)  # two records at one step (train, eval) share a history row

    def finish(self, status, run_json, signal_name, error):
        if run_json is not None:
            # A copy in the run's files/ folder (not a link: run.json is rewritten on --resume).
            files = Path(self.run.dir)
            (files / "run.json").write_text(dumps(run_json, indent=2))
            self.run.save(str(files / "run.json"), base_path=str(files), policy="now")
        if error is not None:
            self.run.summary["error"] = error
        if status == STOPPED:
            # wandb's state for "stopped, to be resumed" is preempting; a zero exit code
            # would mark the run finished, so the code is the shell's for that signal.
            self.run.mark_preempting()
            code = 128 + signal.Signals[signal_name or "SIGTERM"].value
        else:
            code = 0 if status == FINISHED else 1
        with _quiet_stdout():
            self.run.finish(exit_code=code)


class MLflow(Tracker):
    name = package = "mlflow"
    hint = "check MLFLOW_TRACKING_URI"
    STATUS = {FINISHED: "FINISHED", FAILED: "FAILED", STOPPED: "KILLED"}

    ALLOW = "MLFLOW_ALLOW_FILE_STORE"
    _allowed = False  # whether this run set ALLOW (unset again at finish)

    def start(self, out, config, run_name, previous):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        scheme = urlparse(uri).scheme
        if (scheme in ("", "file") or len(scheme) == 1) and self.ALLOW not in os.environ:
            # A file store (a path, a file: URI, a Windows drive): the one local store
            # mlflow-skinny has. MLflow 3 keeps it in maintenance mode and refuses it unless
            # allowed: allowed for this run's lifetime only; an explicit user setting wins.
            os.environ[self.ALLOW], self._allowed = "true", True
        try:
            return self._start(uri, out, config, run_name, previous)
        except BaseException:
            self._disallow()
            raise

    def _disallow(self) -> None:
        if self._allowed:
            os.environ.pop(self.ALLOW, None)
            self._allowed = False

    def _start(self, uri, out, config, run_name, previous):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        run, existing = None, {}
        if previous and previous.get("run_id"):
            try:
                run = client.get_run(previous["run_id"])
                existing = dict(run.data.params)
                # each metric's last step: the steps after the checkpoint that a crash left in
                # the run are the ones this resume replays
                self.held = {k: max((m.step for m in client.get_metric_history(run.info.run_id, k)), default=-1)
                             for k in run.data.metrics}
                client.update_run(run.info.run_id, status="RUNNING")
            except MlflowException as e:
                if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                console.warn(f"report_to mlflow: run {previous['run_id']} is not in {uri} (it started in "
                             f"{previous.get('tracking_uri')}); this resume starts a new MLflow run")
        if run is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            found = client.get_experiment_by_name(experiment)
            try:
                eid = found.experiment_id if found else client.create_experiment(experiment)
            except MlflowException as e:
                if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
                eid = client.get_experiment_by_name(experiment).experiment_id  # another run made it meanwhile
            run = client.create_run(eid, run_name=run_name, tags={
                "mlflow.source.name": "tunesmith", "tunesmith.output_dir": str(out.resolve())})
        self.run_id = run.info.run_id
        self._log_config(config, existing)
        return {"run_id": self.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri}

    def _log_config(self, config: dict, existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        except ImportError:  # pragma: no cover - older layouts
            MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 6000, 100
        # A param cannot change once logged: on --resume only new keys are added (a key
        # allowed to change, such as train.save_steps, keeps its first value), while
        # config.json is replaced by the config now in effect.
        params = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(config).items() if k not in existing]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_dict(self.run_id, json.loads(dumps(config)), "config.json")

    def log(self, metrics, step):
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in metrics.items()])

    def finish(self, status, run_json, signal_name, error):
        try:
            if run_json is not None:
                self.client.log_dict(self.run_id, run_json, "run.json")
            if error is not None:
                self.client.set_tag(self.run_id, "tunesmith.error", error[:5000])
            if signal_name is not None:
                self.client.set_tag(self.run_id, "tunesmith.stopped_by", signal_name)
            self.client.set_terminated(self.run_id, status=self.STATUS[status])
        finally:
            self._disallow()


_PARAM_KEY = re.compile(r"^[\w\-. /]+$")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"learning_rate": 1e-4}} → {"train.learning_rate": "0.0001"}: MLflow params
    are flat strings. A map whose keys are not valid param names stays one JSON value."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(_PARAM_KEY.match(str(x)) for x in v):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (dict, list, tuple)):
            out[key] = dumps(v)
        else:
            out[key] = str(v)
    return out


class Trackio(Tracker):
    name = package = "trackio"
    hint = "check TRACKIO_DIR"

    def start(self, out, config, run_name, previous):
        import trackio
        from trackio import utils

        project = (previous or {}).get("project") or PROJECT
        with _quiet_stdout():
            if previous and previous.get("name"):
                self.run = trackio.init(project=project, name=previous["name"], config=config, resume="allow",
                                        embed=False)
            else:  # a name of its own: trackio resumes runs by name within a project
                self.run = trackio.init(project=project, name=f"{run_name}-{secrets.token_hex(3)}", config=config,
                                        resume="never", embed=False)
        if previous is not None:  # each metric's last step in trackio's local database
            held: dict[str, int] = {}
            for row in trackio.SQLiteStorage.get_logs(project, run_id=self.run.id):
                for k in row.keys() - {"step", "timestamp"}:
                    held[k] = max(held.get(k, -1), int(row["step"]))
            self.held = held
        return {"project": project, "name": self.run.name, "id": self.run.id, "dir": str(utils.TRACKIO_DIR)}

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def finish(self, status, run_json, signal_name, error):
        import trackio

        with _quiet_stdout():
            if run_json is not None:
                with tempfile.TemporaryDirectory() as tmp:  # logged by content: the copy may go
                    path = Path(tmp) / "run.json"
                    path.write_text(dumps(run_json, indent=2))
                    # an artifact name is the project's: this run's own, a version per start
                    self.run.log_artifact(path, name=f"{self.run.name}-run.json", type="run-manifest")
            # trackio has no run status: an alert is what its dashboard shows for one.
            if status == FAILED:
                self.run.alert("training failed", error, level=trackio.AlertLevel.ERROR)
            elif status == STOPPED:
                self.run.alert(f"training stopped by {signal_name or 'a signal'}",
                               "checkpoint saved; --resume continues this run" if run_json is not None else None,
                               level=trackio.AlertLevel.WARN)
            from trackio import context_vars

            if context_vars.current_run.get() is self.run:
                trackio.finish()  # also forgets it, or trackio's atexit hook would finish it again
            else:
                self.run.finish()


ADAPTERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, Wandb, MLflow, Trackio)}


# ---------------------------------------------------------------- before any weights load


def check_installed(report_to: Iterable[str]) -> None:
    """Refuse, in one sentence, trackers whose package is not installed."""
    missing = [n for n in report_to if importlib.util.find_spec(ADAPTERS[n].package) is None]
    if not missing:
        return
    pkgs = " ".join(ADAPTERS[n].package for n in missing)
    names = " and ".join(missing)
    raise TunesmithError(f"report_to: {names} {'needs' if len(missing) == 1 else 'need'} the {pkgs} package"
                         f"{'' if len(missing) == 1 else 's'}, not installed; `pip install {pkgs}` (or "
                         f"`pip install 'tunesmith[trackers]'`), or remove {names} from report_to")


# ---------------------------------------------------------------- the run's trackers


def _where(name: str, ident: dict) -> str:
    if name == "wandb":
        return f"run {ident['id']} in {ident['dir']}"
    if name == "mlflow":
        return f"run {ident['run_id']} in {ident['tracking_uri']}"
    if name == "trackio":
        return f"run {ident['name']} of project {ident['project']} in {ident['dir']}"
    return f"in {ident.get('dir')}"


class Trackers:
    """The trackers of one run, on the main process (elsewhere: none).

        with Trackers(cfg.report_to, out, cfg.to_dict(), resumed) as trackers:
            fit(..., on_start=trackers.start, log_to=trackers.log)
            trackers.finish(FINISHED, run_json)

    The runs start (continue, on --resume) at ``start``, which ``fit`` calls once training
    can begin: an exception before it (a refused --resume) leaves every tracker run as it
    was. Leaving the block by an exception after it marks the runs failed; the exception goes
    on unchanged.
    """

    def __init__(self, names: Iterable[str], out: Path, config: dict, resumed: bool):
        self.out, self.config, self.resumed = Path(out), config, resumed
        self.trackers = [ADAPTERS[n]() for n in dict.fromkeys(names)]
        self.live: list[Tracker] = []
        self.ids: dict[str, dict] = {}
        self.started = self.done = False

    def start(self, step: int = 0) -> None:
        """Start (continue) the runs; ``step``: the step training starts from (a resume's
        checkpoint). A tracker that cannot start is refused in one sentence."""
        if self.started or not self.trackers:
            return
        self.started = True
        resumed, config = self.resumed, self.config
        previous = self._previous() if resumed else {}
        run_name = self.out.resolve().name
        for t in self.trackers:
            try:
                self.ids[t.name] = t.start(self.out, config, run_name, previous.get(t.name))
            except BaseException as e:
                self._end(FAILED, None, None, f"report_to {t.name} could not start: {describe(e)}")
                if not isinstance(e, Exception):
                    raise
                why = str(e) if isinstance(e, TunesmithError) else describe(e)
                raise TunesmithError(f"report_to {t.name}: the tracker could not start a run ({one_line(why, 200)}); "
                                     f"{t.hint}, or remove {t.name} from report_to") from e
            self.live.append(t)
        # Kept for trackers left out of this start too, so a later --resume with them finds them.
        write_text_atomic(self.out / IDS_FILE, dumps({**previous, **self.ids}, indent=2) + "\n")
        verb = "continue" if resumed else "start"
        console.info("trackers: " + "; ".join(f"{n} {_where(n, i)}" for n, i in self.ids.items())
                     + f" ({verb}; ids in {self.out / IDS_FILE})")
        for t in self.live:
            if t.last_held() > step:
                console.info(f"report_to {t.name}: its run already holds steps {step + 1}-{t.last_held()}, logged "
                             f"after checkpoint-{step} before the previous start ended; replayed now, they are not "
                             f"sent to it again")

    def _previous(self) -> dict:
        path = self.out / IDS_FILE
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            console.warn(f"{path} is not JSON; the trackers start new runs")
            return {}
        return data if isinstance(data, dict) else {}

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: its finite numbers, by the same names, at its step."""
        if not self.live:
            return
        metrics = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        step = int(record["step"])
        for t in list(self.live):
            todo = {k: v for k, v in metrics.items() if not t.holds(k, step)}
            if not todo:
                continue
            try:
                t.log(todo, step)
            except Exception as e:
                self.live.remove(t)
                console.warn(f"report_to {t.name}: logging failed ({describe(e)}); {t.name} gets no more "
                             f"metrics from this run, training goes on")

    def finish(self, status: str, run_json: dict | None = None, signal_name: str | None = None,
               error: str | None = None) -> None:
        """End every tracker's run: ``finished``, ``failed`` or ``stopped`` (by ``signal_name``,
        checkpoint saved), attaching ``run_json``."""
        self._end(status, run_json, signal_name, error)

    def _end(self, status, run_json, signal_name, error) -> None:
        if self.done:
            return
        self.done = True
        run_json = json.loads(dumps(run_json)) if run_json is not None else None  # strict JSON everywhere
        for t in [t for t in self.trackers if t.name in self.ids]:
            try:
                t.finish(status, run_json, signal_name, error)
            except Exception as e:
                console.warn(f"report_to {t.name}: ending its run failed ({describe(e)})")
        self.live = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None:
            interrupted = isinstance(exc, KeyboardInterrupt)
            self._end(STOPPED if interrupted else FAILED, None, "SIGINT" if interrupted else None, describe(exc))
        else:
            self._end(FINISHED, None, None, None)
        return False
