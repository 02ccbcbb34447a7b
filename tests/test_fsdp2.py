"""FSDP2 (``train.distributed: fsdp2``) on 2 CPU processes over gloo, through the real
``torchrun ... -m tunesmith train``: the same per-step losses as one process with the same
global batch, half the state per process, kill -9 + ``--resume`` to the same final weights
(and re-sharded onto one process), two "nodes" on one machine, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_kto_reference import write_unpaired
from test_train_preference import write_pairs
from test_train_sft import train_losses, write_sft_data
from tiny import save_tiny_model
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.recipe import run

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
STEPS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, wait: bool = True):
    """``torchrun`` with 2 processes: (exit status, output), or the running process (its output
    goes to a file, so a full pipe never stalls it)."""
    log = open(cwd / f"torchrun-{free_port()}.log", "w+")
    proc = subprocess.Popen([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), *args], cwd=cwd,
                            env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    proc.wait(timeout=300)
    log.seek(0)
    return proc.returncode, log.read()


def config(ws: Path, name: str, **train) -> Path:
    """A full fine-tuning SFT config on the tiny tied-embedding model (absolute paths)."""
    t = {"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-3, "dtype": "fp32", "save_steps": 5,
         "eval_steps": 0, "threads": 1, "distributed": "fsdp2", **train}
    raw = {"model": str(ws / "model"), "full": True,
           "data": {"train": str(ws / "train.jsonl"), "eval": str(ws / "eval.jsonl"), "max_length": 256,
                    "group_by_length": False},
           "train": t}
    path = ws / f"{name}.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("fsdp2")
    save_tiny_model(ws / "model", head_scale=1.0, tie=True)  # SmolLM2 ties its head to the embeddings
    write_sft_data(ws / "train.jsonl")
    write_sft_data(ws / "eval.jsonl", n=26, seed=5)  # 7 batches of 4: rank 1 repeats one to keep step
    write_pairs(ws / "pairs.jsonl")
    write_unpaired(ws / "kto.jsonl")
    return ws


@pytest.fixture(scope="module")
def sharded(ws) -> tuple[Path, str]:
    """An uninterrupted 2-process FSDP2 run through `accelerate launch` with the FSDP example
    config (the killed and resumed run below goes through torchrun: the two launchers must
    shard alike, and give the same weights): (run folder, its output)."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    proc = subprocess.run([accelerate, "launch", "--config_file", str(ROOT / "examples/accelerate/fsdp_gpu.yaml"),
                           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "tunesmith",
                           "train", str(config(ws, "full")), "--set", f"output_dir={ws / 'A'}"],
                          cwd=ws, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws / "A", proc.stdout + proc.stderr


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_fsdp2_full_finetuning_matches_one_process_and_halves_the_state(ws, sharded):
    a, out = sharded
    cfg = load_config(config(ws, "single", grad_accum=2, distributed="ddp"), overrides=[f"output_dir={ws / 'S'}"])
    single = run(cfg)
    la, ls = train_losses(a), train_losses(ws / "S")
    assert list(la) == list(range(1, STEPS + 1)) and la.keys() == ls.keys()
    for step in la:
        assert la[step] == pytest.approx(ls[step], rel=1e-4)
    ev = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    ev_single = [json.loads(x) for x in (ws / "S" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in ev if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in ev_single if "eval_loss" in r], rel=1e-4)  # 26 items: every one counted once
    wa, ws_ = weights(a), weights(ws / "S")
    assert wa.keys() == ws_.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], ws_[k], rtol=1e-4, atol=1e-5)

    manifest = json.loads((a / "run.json").read_text())
    d = manifest["distributed"]
    assert d["strategy"] == "fsdp2" and d["processes"] == 2 and d["sharded_units"] == 3
    assert len(d["peak_memory_bytes_per_process"]) == 2
    whole = single["distributed"]["state_bytes_per_process"][0]
    for part in d["state_bytes_per_process"]:
        for key in ("weights", "gradients", "optimizer"):
            assert 0.45 < part[key] / whole[key] < 0.55, (key, part, whole)  # ~1/2 each (uneven rows)
    assert single["distributed"]["strategy"] == "none"
    assert "FSDP2 over 2 processes: 3 units sharded" in out
    assert "per process at 2 processes" in out and "(train.distributed: fsdp2)" in out

    from transformers import AutoModelForCausalLM  # final/ is a plain Hugging Face folder

    model = AutoModelForCausalLM.from_pretrained(a / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), wa["model.embed_tokens.weight"])


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (its child whose environment says RANK=rank)."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or f"PPid:\t{torchrun_pid}\n" not in (proc / "status").read_text():
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:  # a process that ended meanwhile
            continue
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun_pid}")


@pytest.mark.parametrize("rank", [0, 1])  # 0 writes the run folder; 1 only holds shards
def test_kill9_of_a_process_then_resume_gives_the_same_weights(ws, sharded, rank):
    a, _ = sharded
    cfg = config(ws, "full")
    out_dir = ws / f"C{rank}"
    proc = torchrun(["-m", "tunesmith", "train", str(cfg), "--set", f"output_dir={out_dir}"], ws, wait=False)
    deadline = time.time() + 240
    while not (out_dir / "checkpoint-10").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint at step 10"
        time.sleep(0.02)
    os.kill(_rank_pid(proc.pid, rank), signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0 and not (out_dir / "final").exists()
    if rank == 1:
        shutil.copytree(out_dir, ws / "R")

    rc, out = torchrun(["-m", "tunesmith", "train", str(cfg), "--set", f"output_dir={out_dir}", "--resume"], ws)
    assert rc == 0, out[-3000:]
    assert "resumed from" in out
    wa, wc = weights(a), weights(out_dir)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)  # bit for bit: same shards, RNG, order and launcher-blind

    if rank == 0:
        return
    # re-sharded onto one process: the same global batch (grad_accum 2) resumes; another is refused
    with pytest.raises(TunesmithError, match=r"8 items per optimizer step \(2 processes\).*grad_accum"):
        run(load_config(cfg, overrides=[f"output_dir={ws / 'R'}"]), resume=True)
    run(load_config(cfg, overrides=[f"output_dir={ws / 'R'}", "train.grad_accum=2", "train.distributed=ddp"]),
        resume=True)
    w1 = weights(ws / "R")
    for k in wa:
        torch.testing.assert_close(w1[k], wa[k], rtol=1e-4, atol=1e-5)


def test_two_nodes_on_one_machine_write_one_run_folder_and_agree_on_resume(ws, sharded):
    a, _ = sharded
    cfg = config(ws, "full")
    nodes = [ws / "node0", ws / "node1"]
    port = free_port()

    def launch(*extra):
        logs = [open(n.parent / f"{n.name}-{port}.log", "w+") for n in nodes]
        procs = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                   "--rdzv-endpoint", f"localhost:{port}", "-m", "tunesmith", "train", str(cfg),
                                   "--set", "output_dir=run", *extra], cwd=n, env=ENV, stdout=log,
                                  stderr=subprocess.STDOUT, text=True) for n, log in zip(nodes, logs)]
        for p in procs:
            p.wait(timeout=300)
        return [(log.seek(0) or log.read(), p.returncode) for p, log in zip(procs, logs)]

    for n in nodes:
        n.mkdir()
    # each "node" runs in its own folder, so a relative output_dir shows who wrote: global rank 0 only
    results = launch()
    assert all(rc == 0 for _, rc in results), results[0][0][-2000:] + results[1][0][-2000:]
    written = [n / "run" for n in nodes if (n / "run").exists()]
    assert len(written) == 1 and (written[0] / "final").is_dir()
    assert train_losses(written[0]) == train_losses(a)  # the same world size, the same reductions
    assert json.loads((written[0] / "run.json").read_text())["distributed"]["processes"] == 2

    # unfinished again; the other node's folder is empty: the ranks see different checkpoints → refused
    shutil.rmtree(written[0] / "final")
    (written[0] / "run.json").unlink()
    port = free_port()
    results = launch("--resume")
    assert all(rc != 0 for _, rc in results)
    assert "the run folder must be on a file system every node shares" in results[0][0] + results[1][0]


WORKER = """
import sys
from tunesmith.config import load_config
from tunesmith.train.recipe import run
for path in sys.argv[1:]:
    run(load_config(path))
"""


def test_every_method_under_fsdp2_matches_one_process(ws):
    """LoRA SFT (with gradient checkpointing), DPO (LoRA: adapter-disabled reference; full: a
    frozen copy), KTO and a reward model, in one 2-process launch (``run`` as the CLI calls it), each against one process."""
    base = {"model": str(ws / "model"), "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "dtype": "fp32", "save_steps": 0,
                      "eval_steps": 0, "threads": 1, "distributed": "fsdp2"}}
    checkpointed = {**base["train"], "gradient_checkpointing": True}  # recomputed layers gather again
    runs = {"sft": ({"method": "sft", "train": checkpointed}, "train.jsonl"), "dpo": ({"method": "dpo"}, "pairs.jsonl"),
            "dpo-full": ({"method": "dpo", "full": True}, "pairs.jsonl"), "kto": ({"method": "kto"}, "kto.jsonl"),
            "reward": ({"method": "reward"}, "pairs.jsonl")}
    paths = []
    for name, (extra, data) in runs.items():
        raw = {**base, **extra, "data": {"train": str(ws / data), "eval": str(ws / data), "max_length": 256,
                                         "group_by_length": False}, "output_dir": str(ws / "m" / name)}
        paths.append(ws / f"m-{name}.yaml")
        paths[-1].write_text(json.dumps(raw))
    (ws / "worker.py").write_text(WORKER)
    rc, out = torchrun([str(ws / "worker.py"), *map(str, paths)], ws)
    assert rc == 0, out[-3000:]
    for name, path in zip(runs, paths):
        run(load_config(path, overrides=[f"output_dir={ws / 's' / name}", "train.grad_accum=2",
                                         "train.distributed=ddp"]))
        sharded_run, single = ws / "m" / name, ws / "s" / name
        assert json.loads((sharded_run / "run.json").read_text())["distributed"]["strategy"] == "fsdp2"
        la, ls = train_losses(sharded_run), train_losses(single)
        assert list(la) == [1, 2, 3] and la.keys() == ls.keys(), name
        for step in la:
            assert la[step] == pytest.approx(ls[step], rel=1e-4, abs=1e-6), (name, step)
        ea = [json.loads(x)["eval_loss"] for x in (sharded_run / "metrics.jsonl").read_text().splitlines()
              if "eval_loss" in x]
        es = [json.loads(x)["eval_loss"] for x in (single / "metrics.jsonl").read_text().splitlines()
              if "eval_loss" in x]
        assert ea == pytest.approx(es, rel=1e-4), name


def test_fsdp2_refusals_are_one_sentence(ws, monkeypatch):
    grpo = load_config(None, raw={"model": str(ws / "model"), "method": "grpo", "data": {"train": str(ws / "pairs.jsonl")},
                                  "grpo": {"reward_funcs": ["test_train_rlhf:short"]},
                                  "train": {"distributed": "fsdp2"}, "output_dir": str(ws / "g")})
    with pytest.raises(TunesmithError, match="GRPO under train.distributed: fsdp2 is not supported yet"):
        run(grpo)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    cfg = load_config(config(ws, "acc", distributed="ddp"), overrides=[f"output_dir={ws / 'acc'}"])
    with pytest.raises(TunesmithError, match="accelerate launch was given an FSDP config.*train.distributed: fsdp2"):
        run(cfg)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(TunesmithError, match="DeepSpeed config, which tunesmith's training loop does not run under"):
        run(cfg)
    with pytest.raises(TunesmithError, match="train.distributed"):
        load_config(config(ws, "bad", distributed="zero3"))
