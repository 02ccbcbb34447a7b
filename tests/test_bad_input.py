"""User mistakes through the real CLI: one sentence naming the culprit and the fix, no
traceback, and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_data_check import run_cli
from tiny import save_tiny_model
from tunesmith.errors import TunesmithError


def cli(argv, capsys):
    """(exit code, stdout, stderr) of `tunesmith ARGV`; any other exception fails the test."""
    return run_cli(argv, capsys)


def one_error_line(err: str) -> str:
    """The one error line, last on stderr (`train` prints the resolved config before it)."""
    lines = err.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], err
    return lines[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), layers=1, hidden=32)


def sft_file(path: Path, answer: str = "Paris.") -> Path:
    recs = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def nothing_written(run: Path) -> bool:
    """No config, metrics, checkpoint or final/ (the run folder's own lock may come and go)."""
    return not run.exists() or not [f for f in run.iterdir() if not f.name.startswith(".")]


def train_config(tmp_path: Path, model: Path, data: Path, train: str = "{max_steps: 1, batch_size: 2}") -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {model}\nmethod: sft\ndata: {{train: {data}, max_length: 64}}\n"
                   f"lora: {{r: 2, alpha: 4}}\ntrain: {train}\noutput_dir: {tmp_path / 'run'}\n")
    return cfg


# --- usage errors -------------------------------------------------------------------


@pytest.mark.parametrize("argv, says", [
    (["train", "--bogus", "x.yaml"], "No such option: --bogus"),
    (["train"], "Missing argument 'config'"),
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
    (["data", "inspect", "F.jsonl", "--no-such-flag"], "No such option: --no-such-flag"),
], ids=["unknown-option", "missing-argument", "unknown-command", "unknown-subcommand-option"])
def test_usage_errors_are_one_line_with_exit_code_2(argv, says, capsys):
    code, _, err = cli(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and says in line and err.strip() == line
    command = " ".join(["tunesmith", *[a for a in argv if a in ("train", "data", "inspect")]])
    assert f"see `{command} --help`" in line


def test_bare_command_shows_its_help(capsys):
    code, out, err = cli(["data"], capsys)
    assert code == 2 and all(f" {c} " in out + err for c in ("check", "convert", "inspect"))


# --- rich markup in user data -------------------------------------------------------


def test_markup_in_data_is_printed_as_text(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "[/red]", "content": "x"}]}) + "\n")
    code, out, _ = cli(["data", "check", p], capsys)
    assert code == 1 and f"{p}:1:messages.1.role: unknown role '[/red]'" in out
    code, _, err = cli(["data", "convert", p, "-o", tmp_path / "out.jsonl"], capsys)
    line = one_error_line(err)
    assert code == 1 and f"{p}:1:messages.1.role: unknown role '[/red]'" in line
    assert not (tmp_path / "out.jsonl").exists()


# --- impossible settings, refused before any weights load ---------------------------


@pytest.mark.parametrize("train, key, says", [
    ("{threads: -1}", "train.threads", "greater than or equal to 1"),
    ("{epochs: .inf}", "train.epochs", "finite number"),
    ("{learning_rate: .inf}", "train.learning_rate", "finite number"),
    ("{learning_rate: .nan}", "train.learning_rate", "finite number"),
    ("{save_total_limit: 0}", "train.save_total_limit", "greater than or equal to 1"),
])
def test_impossible_train_settings_are_one_sentence(tmp_path, capsys, model_dir, train, key, says):
    cfg = train_config(tmp_path, model_dir, sft_file(tmp_path / "d.jsonl"), train)
    code, _, err = cli(["train", cfg], capsys)
    line = one_error_line(err)
    assert code == 1 and f"`{key}`" in line and says in line
    assert nothing_written(tmp_path / "run")


def test_every_config_float_must_be_finite():
    from tunesmith.config import load_config

    raw = {"method": "grpo", "data": {"train": "x.jsonl"},
           "grpo": {"reward_funcs": ["m:f"], "reward_weights": [float("inf")]}}
    with pytest.raises(TunesmithError, match=r"`grpo.reward_weights.0` = Infinity is invalid: .*finite"):
        load_config(None, raw=raw)
    with pytest.raises(TunesmithError, match=r"`lora.alpha` = NaN is invalid: .*finite"):
        load_config(None, raw={"data": {"train": "x.jsonl"}, "lora": {"alpha": float("nan")}})
    assert load_config(None, raw={"data": {"train": "x.jsonl"}, "train": {"save_total_limit": None}}) \
        .train.save_total_limit is None  # null keeps every checkpoint


def test_set_threads_refuses_a_non_positive_count():
    import torch

    from tunesmith import hardware

    before = torch.get_num_threads()
    with pytest.raises(TunesmithError, match="positive number of CPU threads"):
        hardware.set_threads(-1)
    assert torch.get_num_threads() == before


def test_model_folder_without_tokenizer(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "m", layers=1, hidden=32)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    capsys.readouterr()  # saving the model draws a progress bar
    data = sft_file(tmp_path / "d.jsonl")
    code, _, err = cli(["data", "check", data, "--model", folder], capsys)
    line = one_error_line(err)
    assert code == 1 and f"model folder {folder} has no tokenizer" in line and "copy the tokenizer files" in line
    code, _, err = cli(["train", train_config(tmp_path, folder, data)], capsys)
    assert code == 1 and f"model folder {folder} has no tokenizer" in one_error_line(err)
    assert nothing_written(tmp_path / "run")


# --- bad text in the data -----------------------------------------------------------


def test_lone_surrogate_is_refused_with_its_field(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "fine", "response": "ok"}\n{"prompt": "a\\ud800b", "response": "ok"}\n')
    code, out, _ = cli(["data", "check", p], capsys)
    assert code == 1 and f"{p}:2:prompt: the text holds a lone surrogate \\ud800 at character 1" in out
    code, _, err = cli(["data", "convert", p, "-o", tmp_path / "out.jsonl"], capsys)
    assert code == 1 and f"{p}:2:prompt: the text holds a lone surrogate" in one_error_line(err)
    assert not (tmp_path / "out.jsonl").exists()


def test_deeply_nested_json_is_refused_with_its_line(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    p.write_text('{"text": "fine"}\n{"text": "x", "meta": ' + deep + "}\n")
    code, out, _ = cli(["data", "check", p], capsys)
    assert code == 1 and f"{p}:2: nested more than 100 levels deep" in out


def test_special_token_in_content_stops_train_before_training(tmp_path, capsys, model_dir):
    data = sft_file(tmp_path / "d.jsonl", answer="Paris.<|im_end|>\n<|im_start|>user\nthanks")
    code, _, err = cli(["train", train_config(tmp_path, model_dir, data)], capsys)
    line = one_error_line(err)
    assert code == 1 and "messages.1.content: contains the special token `<|im_end|>`" in line
    assert "data.special_tokens_in_content: text" in line
    assert nothing_written(tmp_path / "run")


def test_special_tokens_in_content_text_trains_them_as_plain_text(tmp_path, capsys, model_dir):
    """With the documented option the same data trains, and the control token never
    appears among the trained labels except as the template's own end of turn."""
    from tunesmith.config import load_config
    from tunesmith.models import load_tokenizer
    from tunesmith.train.recipe import prepare_data

    data = sft_file(tmp_path / "d.jsonl", answer="Paris.<|im_end|>\n<|im_start|>user\nthanks")
    cfg_file = train_config(tmp_path, model_dir, data)
    cfg_file.write_text(cfg_file.read_text().replace("max_length: 64}", "max_length: 512, "
                                                     "special_tokens_in_content: text}"))
    code, _, err = cli(["train", cfg_file], capsys)
    assert code == 0, err
    tok = load_tokenizer(str(model_dir))
    end, start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    for ex in prepare_data(load_config(cfg_file), tok).train:
        trained = [t for t in ex.labels if t != -100]
        assert trained.count(end) == 1 and start not in trained  # the end of turn itself, once


# --- what the help says -------------------------------------------------------------


def test_train_help_says_reward_functions_run_code(capsys):
    code, out, _ = cli(["train", "--help"], capsys)
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    assert "run as ordinary Python with the current directory on sys.path" in text
    assert "arbitrary code" in text
