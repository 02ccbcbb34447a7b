"""Nothing silent, nothing lost — the trainer's side: one writer per run folder, resume that
notices changed inputs, no non-finite weights saved, strict JSON, and the faults a kill, a
full disk or a damaged file leave behind. Each test failed before its fix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_train_sft import make_cfg, metrics, write_sft_data
from tiny import save_tiny_model
from tunesmith.config import save_config
from tunesmith.errors import TunesmithError
from tunesmith.files import LOCK, FolderLock, read_jsonl, write_text_atomic
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.recipe import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-reliability"))


def _cfg(tmp_path: Path, model_dir: Path, **over):
    over.setdefault("data__eval_split", 0.0)
    over.setdefault("train__max_steps", 4)
    over.setdefault("train__save_steps", 2)
    return make_cfg(tmp_path, model_dir, **over)


def _strict(path: Path) -> list:
    """Every line parses as strict JSON (no NaN / Infinity literals)."""
    def refuse(name):
        raise AssertionError(f"{path} holds the non-JSON literal {name}")
    return [json.loads(x, parse_constant=refuse) for x in path.read_text().splitlines() if x.strip()]


# ---------------------------------------------------------------- one writer per run folder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_second_writer_is_refused_before_anything_is_written(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir)
    out = Path(cfg.output_dir)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from tunesmith.files import FolderLock
        with FolderLock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TunesmithError, match=rf"run folder {out} is in use by pid {holder.pid} on "
                                                 rf"{socket.gethostname()}"):
            run(cfg)
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing of a run was written
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, model_dir, capsys):
    cfg = _cfg(tmp_path, model_dir, train__max_steps=2)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    (out / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "earlier",
                                        "command": "tunesmith train killed.yaml"}))
    run(cfg)
    assert "taking over the stale lock" in capsys.readouterr().err
    assert (out / "final").is_dir() and not (out / LOCK).exists()  # released at the end


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": "x", "command": "y"}))
    with pytest.raises(TunesmithError, match="in use by pid .* on elsewhere"):
        FolderLock(tmp_path).acquire()


# ---------------------------------------------------------------- resume that notices


def test_resume_refuses_changed_training_data_unless_forced(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, train__max_steps=6, train__save_steps=2)
    out = Path(cfg.output_dir)
    run(cfg)
    (out / "final").rename(out / "final-first")  # as if the run had stopped after checkpoint 6
    (out / "run.json").unlink()
    data = Path(cfg.data.train)
    write_sft_data(data, seed=1)  # the training file replaced between the runs
    with pytest.raises(TunesmithError, match=rf"training reads changed since checkpoint-6: data file {data}"):
        run(cfg, resume=True)
    assert not (out / "final").exists()
    manifest = run(cfg, resume=True, force_resume=True)
    assert manifest["force_resumed"] and str(data) in manifest["force_resumed"][0]
    assert json.loads((out / "run.json").read_text())["inputs"][f"data file {data}"] == \
        hashlib.sha256(data.read_bytes()).hexdigest()


def test_resuming_a_finished_run_changes_nothing(tmp_path, model_dir, capsys):
    cfg = _cfg(tmp_path, model_dir)
    out = Path(cfg.output_dir)
    first = run(cfg)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}
    assert run(cfg, resume=True) == json.loads((out / "run.json").read_text()) == json.loads(json.dumps(first))
    assert "nothing to resume" in capsys.readouterr().err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_a_shape_mismatch_under_force_resume_is_one_sentence(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, train__max_steps=4)
    run(cfg)
    (Path(cfg.output_dir) / "final").rename(Path(cfg.output_dir) / "final-first")
    bigger = _cfg(tmp_path, model_dir, train__max_steps=4, lora__r=8)
    with pytest.raises(TunesmithError, match=r"has shape \(4, .*where this model has \(8, "):
        run(bigger, resume=True, force_resume=True)


# ---------------------------------------------------------------- no non-finite weights


def test_a_diverging_run_stops_non_zero_and_saves_no_final(tmp_path, model_dir):
    """lr 1e30: the first update leaves huge but finite weights and a finite loss; the next
    loss is NaN. Every checkpoint holds weights that never gave a finite loss."""
    cfg = _cfg(tmp_path, model_dir, train__max_steps=4, train__save_steps=1, train__learning_rate=1e30,
               train__lr_scheduler="constant")
    out = Path(cfg.output_dir)
    with pytest.raises(TunesmithError, match=r"diverged at step 4: .*no checkpoint holds weights that gave a finite"):
        run(cfg)
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
    assert sorted(p.name for p in out.glob("diverged-checkpoint-*")) == ["diverged-checkpoint-2",
                                                                         "diverged-checkpoint-3"]
    rows = _strict(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("skipped_nonfinite")] == [2, 3, 4]


def test_a_non_finite_eval_loss_counts_as_non_finite(tmp_path, model_dir, monkeypatch):
    from tunesmith.train.methods import sft

    orig = sft.SFT.loss

    def nan_when_evaluating(self, module, batch):
        loss, m = orig(self, module, batch)
        return (loss if module.training else loss * float("nan")), m

    monkeypatch.setattr(sft.SFT, "loss", nan_when_evaluating)
    cfg = _cfg(tmp_path, model_dir, data__eval_split=0.25, train__eval_steps=0, train__max_steps=3)
    out = Path(cfg.output_dir)
    with pytest.raises(TunesmithError, match="diverged at step 3"):
        run(cfg)
    assert not (out / "final").exists()
    assert [r["eval_loss"] for r in _strict(out / "metrics.jsonl") if "eval_loss" in r] == [None]  # null, not NaN


# ---------------------------------------------------------------- faults and damage


def test_a_full_disk_is_one_sentence_and_keeps_what_was_saved(tmp_path, model_dir, monkeypatch):
    import safetensors.torch as st

    real, calls = st.save_file, {"n": 0}

    def full_after_first_checkpoint(tensors, path, metadata=None):
        calls["n"] += 1
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", full_after_first_checkpoint)
    cfg = _cfg(tmp_path, model_dir, train__max_steps=6)
    out = Path(cfg.output_dir)
    with pytest.raises(TunesmithError, match=r"no space left on the device while writing .*checkpoint-4"):
        run(cfg)
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")] == []
    assert ckpt.load_checkpoint(out / "checkpoint-2").step == 2  # intact and verified


@pytest.mark.parametrize("damage", ["entry", "state_dicts"])
def test_a_malformed_checkpoint_manifest_is_skipped_with_a_reason(tmp_path, model_dir, damage, capsys):
    cfg = _cfg(tmp_path, model_dir, train__max_steps=4)
    out = Path(cfg.output_dir)
    run(cfg)
    (out / "final").rename(out / "final-first")
    m = json.loads((out / "checkpoint-4" / "manifest.json").read_text())
    if damage == "entry":
        m["files"]["cursor.json"] = "oops"
    else:
        del m["state_dicts"]
    (out / "checkpoint-4" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TunesmithError, match="checkpoint .*checkpoint-4: manifest.json is malformed"):
        ckpt.load_checkpoint(out / "checkpoint-4")
    if damage == "entry":  # sizes are read when listing: the damaged one is skipped, 2 resumes
        run(cfg, resume=True)
        assert "skipping incomplete checkpoint checkpoint-4: manifest.json is malformed" in capsys.readouterr().err


def test_a_torn_metrics_line_is_dropped_on_resume_and_in_the_report(tmp_path, model_dir):
    from tunesmith.evaluate.plots import read_metrics

    cfg = _cfg(tmp_path, model_dir, train__max_steps=6)
    out = Path(cfg.output_dir)
    run(cfg)
    whole = metrics(out)
    (out / "final").rename(out / "final-first")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # what a kill in the middle of a write leaves
    assert read_metrics(out) == whole
    run(cfg, resume=True)
    assert _strict(out / "metrics.jsonl") == [r for r in whole if r["step"] <= 6]


def test_save_total_limit_also_removes_older_incomplete_checkpoints(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, train__max_steps=4, train__save_steps=2)
    out = Path(cfg.output_dir)
    (out / "checkpoint-1").mkdir(parents=True)  # left by an older crash: no manifest
    (out / "checkpoint-1" / "model.safetensors").write_bytes(b"half")
    run(cfg)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_config_mistakes_found_before_any_weights_load(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir)
    Path(cfg.output_dir).write_text("not a folder")
    with pytest.raises(TunesmithError, match="output_dir .* is a file"):
        run(cfg)


def test_an_eval_file_whose_records_are_all_dropped_is_refused(tmp_path, model_dir):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200, "response": "yes"}) + "\n")
    cfg = _cfg(tmp_path, model_dir, data__eval=str(long), data__max_length=64, data__on_overflow="drop")
    with pytest.raises(TunesmithError, match="every one of the 1 eval records"):
        run(cfg)


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    path.write_text('{"old": true}')

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"new": true}')
    assert path.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_sigterm_during_the_final_save_lets_it_finish(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, data__eval_split=0.25, train__max_steps=2)
    save_config(cfg, tmp_path / "cfg.yaml")
    script = tmp_path / "term.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from peft import PeftModel
        save = PeftModel.save_pretrained
        def save_(self, *a, **kw):
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stopping the job at the very end
            return save(self, *a, **kw)
        PeftModel.save_pretrained = save_
        from tunesmith.cli import main
        main(sys.argv[1:])
    """))
    p = subprocess.run([sys.executable, str(script), "train", str(tmp_path / "cfg.yaml")], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert p.returncode == 0, p.stderr
    out = Path(cfg.output_dir)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["final"] == str(out / "final")


# ---------------------------------------------------------------- kill -9 at random moments

KILLER = textwrap.dedent("""
    # `tunesmith train ...` that kills itself (SIGKILL) at the K-th event of one kind
    # (argv[1] = "KIND:K", or "none"): "loss" (a training step's forward), "checkpoint" or
    # "final" (a tensor file written into, or an fsync of, that folder's atomic save).
    import os, signal, sys
    import safetensors.torch as st
    from tunesmith import files
    from tunesmith.train.methods import sft
    kind, _, k = sys.argv[1].partition(":")
    seen = [0]
    def tick(what):
        if what == kind:
            seen[0] += 1
            if seen[0] == int(k):
                os.kill(os.getpid(), signal.SIGKILL)
    def where(path):
        p = str(path)
        return "final" if "final" in p else "checkpoint" if "checkpoint-" in p else None
    loss, save_file, fsync = sft.SFT.loss, st.save_file, files.fsync
    def loss_(self, *a, **kw):
        tick("loss")
        return loss(self, *a, **kw)
    def save_file_(tensors, path, *a, **kw):
        tick(where(path))
        return save_file(tensors, path, *a, **kw)
    def fsync_(path):
        tick(where(path))
        return fsync(path)
    sft.SFT.loss, st.save_file, files.fsync = loss_, save_file_, fsync_
    from tunesmith.cli import main
    main(sys.argv[2:])
""")


def _train(args: list[str], kill: str, tmp: Path) -> subprocess.CompletedProcess:
    script = tmp / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, str(script), kill, "train", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_kill_9_at_seeded_random_moments_then_resume_gives_the_same_weights(tmp_path, model_dir):
    """A seeded schedule of kills — during a step, during checkpoint saves, during the final
    save — each followed by `--set resume=auto`, until the run finishes: its final weights
    equal an uninterrupted run's byte for byte, and it logged every step once."""
    runs = {}
    for name in ("straight", "killed"):
        d = tmp_path / name
        d.mkdir()
        cfg = _cfg(d, model_dir, train__max_steps=8, train__save_steps=2, train__save_total_limit=2)
        save_config(cfg, d / "cfg.yaml")
        runs[name] = (d / "cfg.yaml", Path(cfg.output_dir))
    p = _train([str(runs["straight"][0])], "none", tmp_path)
    assert p.returncode == 0, p.stderr
    rnd = random.Random(20261201)
    # a fresh start killed in a step; a checkpoint save; the final save (all steps done);
    # then the final checkpoint, which a resume at the last step writes again
    schedule = [f"loss:{rnd.randint(1, 4)}", f"checkpoint:{rnd.randint(1, 15)}", f"final:{rnd.randint(1, 6)}",
                f"checkpoint:{rnd.randint(1, 15)}", "none"]
    cfg_file, out = runs["killed"]
    for kill in schedule:
        p = _train([str(cfg_file), "--set", "resume=auto"], kill, tmp_path)
        assert p.returncode == (0 if kill == "none" else -9), (kill, p.stderr[-2000:])
        assert not ckpt.find_checkpoints(out)[1]  # never a half-written checkpoint under its name
        assert not (out / "final").exists() or kill == "none"
    assert _sha(out / "final") == _sha(runs["straight"][1] / "final")
    straight = {m["step"]: m["loss"] for m in metrics(runs["straight"][1]) if m.get("loss") is not None}
    killed = {m["step"]: m["loss"] for m in read_jsonl(out / "metrics.jsonl") if m.get("loss") is not None}
    assert killed == straight and sorted(killed) == list(range(1, 9))
