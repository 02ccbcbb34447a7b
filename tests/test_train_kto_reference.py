"""KTO end to end, and the reference-model options (precompute_ref, ref_model) on tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from test_train_preference import WORDS, model_dir, pref_cfg, write_pairs  # noqa: F401 (fixture)
from test_train_sft import make_cfg, metrics, train_losses
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.train.methods.reference import REF_FILE
from tunesmith.train.recipe import run


def write_unpaired(path: Path, n: int = 32, seed: int = 1) -> Path:
    """kto_en_demo's shape: messages + a boolean label (good: repeat the words; bad: refuse)."""
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            w = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 4)))
            good = i % 3 != 0
            answer = f"{w} done." if good else "I will not repeat that, sorry."
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {w}"},
                                             {"role": "assistant", "content": answer}], "label": good}) + "\n")
    return path


def with_(cfg, **sections):
    raw = cfg.to_dict()
    for name, values in sections.items():
        raw[name] = {**(raw.get(name) or {}), **values} if isinstance(values, dict) else values
    return load_config(None, raw=raw)


def evals(cfg) -> list[dict]:
    return [m for m in metrics(Path(cfg.output_dir)) if any(k.startswith("eval_") for k in m)]


def test_kto_learns_from_unpaired_labels(tmp_path, model_dir):  # noqa: F811
    data = write_unpaired(tmp_path / "kto.jsonl")
    cfg = with_(pref_cfg(tmp_path, model_dir, "kto"), data={"train": str(data), "eval": str(data)})
    run(cfg)
    ev = evals(cfg)
    assert ev[0]["step"] == 0 and ev[0]["eval_rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert ev[0]["eval_kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before training
    last = ev[-1]
    assert last["eval_rewards/chosen"] > 0 > last["eval_rewards/rejected"], last
    assert last["eval_rewards/margins"] == pytest.approx(last["eval_rewards/chosen"] - last["eval_rewards/rejected"])
    assert last["eval_loss"] < ev[0]["eval_loss"] - 0.1
    logged = [m for m in metrics(Path(cfg.output_dir)) if "loss" in m and "kl" in m]
    # a micro-batch without undesirable examples logs no rewards/rejected (a mean over nothing)
    assert logged and {"logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"} <= {
        k for m in logged for k in m}


def test_kto_unpairs_preference_data_and_pairs_kl_rows_across_prompts(tmp_path, model_dir):  # noqa: F811
    from tunesmith.models import load_tokenizer
    from tunesmith.train.recipe import prepare_data

    cfg = pref_cfg(tmp_path, model_dir, "kto")
    prepared = prepare_data(cfg, load_tokenizer(str(model_dir)))
    assert len(prepared.train) == 2 * 32  # 32 pairs → 32 desirable + 32 undesirable
    assert sum(it.example.desirable for it in prepared.train) == 32
    for it in prepared.train:
        own = it.example.completion.input_ids
        p = it.example.prompt_len
        assert it.kl.input_ids[:p] == own[:p]  # the item's own prompt...
        partner = [o for o in prepared.train if o.example.completion.input_ids[o.example.prompt_len:]
                   == it.kl.input_ids[p:]]
        assert any(o is not it for o in partner)  # ...with another item's completion


def test_kto_refuses_a_batch_of_one(tmp_path, model_dir):  # noqa: F811
    cfg = with_(pref_cfg(tmp_path, model_dir, "kto"), train={"batch_size": 1})
    with pytest.raises(TunesmithError, match="batch_size >= 2"):
        run(cfg)


@pytest.mark.parametrize("method,full", [("dpo", False), ("kto", False), ("dpo", True)])
def test_precompute_ref_gives_the_same_training_as_an_online_reference(tmp_path, model_dir, method, full):  # noqa: F811
    base = pref_cfg(tmp_path, model_dir, method)
    short = {"max_steps": 6, "eval_steps": 3, "learning_rate": 1e-3 if full else 2e-2}
    extra = {"full": True, "lora": None} if full else {}
    online = with_(base, train=short, output_dir=str(tmp_path / "online"), **extra)
    pre = with_(online, preference={"precompute_ref": True}, output_dir=str(tmp_path / "pre"))
    run(online)
    run(pre)
    a, b = train_losses(Path(online.output_dir)), train_losses(Path(pre.output_dir))
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a), (a, b)
    ev_a, ev_b = evals(online), evals(pre)
    key = "eval_rewards/margins"
    assert [m[key] for m in ev_a] == pytest.approx([m[key] for m in ev_b], abs=1e-5)
    assert (Path(pre.output_dir) / REF_FILE).exists() and not (Path(online.output_dir) / REF_FILE).exists()


def test_precomputed_reference_is_stored_and_reused_on_resume(tmp_path, model_dir, capsys):  # noqa: F811
    cfg = with_(pref_cfg(tmp_path, model_dir, "dpo"), preference={"precompute_ref": True},
                train={"max_steps": 6, "save_steps": 3})
    run(cfg)
    stored = Path(cfg.output_dir) / REF_FILE
    stamp = stored.stat().st_mtime_ns
    assert "computed in" in capsys.readouterr().err
    # resuming a finished run is a no-op (tests/test_reliability.py): resume one stopped at its last checkpoint
    (Path(cfg.output_dir) / "final").rename(Path(cfg.output_dir) / "final-first")
    run(cfg, resume=True)
    assert "reused from" in capsys.readouterr().err
    assert stored.stat().st_mtime_ns == stamp
    # different data → different values: the stored file is not trusted, it is recomputed
    other = write_pairs(tmp_path / "other.jsonl", seed=5)
    changed = with_(cfg, data={"train": str(other), "eval": str(other)}, output_dir=str(cfg.output_dir) + "2")
    (Path(changed.output_dir)).mkdir()
    (Path(changed.output_dir) / REF_FILE).write_bytes(stored.read_bytes())
    run(changed)
    assert "computed in" in capsys.readouterr().err


def test_ref_model_names_a_different_checkpoint(tmp_path, model_dir):  # noqa: F811
    (tmp_path / "sft").mkdir()
    sft = make_cfg(tmp_path / "sft", model_dir, train__max_steps=4, train__learning_rate=3e-2)
    run(sft)
    sft_final = str(Path(sft.output_dir) / "final")
    short = {"max_steps": 2, "eval_steps": 1}
    # policy = base, reference = the SFT model: implicit rewards differ from 0 before training
    vs_sft = with_(pref_cfg(tmp_path, model_dir, "dpo"), preference={"ref_model": sft_final}, train=short,
                   output_dir=str(tmp_path / "a"))
    run(vs_sft)
    assert abs(evals(vs_sft)[0]["eval_rewards/chosen"]) > 1e-3
    # policy starts from the SFT model too, and the reference is that same checkpoint: rewards start at 0
    same = with_(vs_sft, init_from=sft_final, output_dir=str(tmp_path / "b"))
    run(same)
    assert evals(same)[0]["eval_rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("method", ["simpo", "orpo"])
def test_reference_options_are_refused_for_reference_free_losses(tmp_path, model_dir, method):  # noqa: F811
    cfg = with_(pref_cfg(tmp_path, model_dir, method), preference={"precompute_ref": True})
    with pytest.raises(TunesmithError, match="reference-free"):
        run(cfg)
