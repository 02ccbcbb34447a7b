"""render_tokens (data/inspect.py): what trains is visible, with and without colour."""

from rich.console import Console
from rich.text import Text
from tiny import make_tokenizer

from tunesmith.data.inspect import render_tokens, token_summary
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_messages

CHAT = [
    {"role": "user", "content": "Use [bold] and\ttabs?"},
    {"role": "assistant", "content": "Yes:\n[bold] works."},
]


def test_plain_marks_trained_runs_and_shows_whitespace():
    tok = make_tokenizer("chatml")
    ex = tokenize_messages(CHAT, tok)
    out = render_tokens(tok, ex.input_ids, ex.labels, color=False)
    body, summary = out.rsplit("\n", 1)
    assert body.count("[[") == body.count("]]") == 1
    assert body.split("[[")[1].split("]]")[0] == "Yes:↵\n[bold] works.<|im_end|>↵\n"
    assert "and⇥tabs?" in body and "<|im_start|>user↵\n" in body
    n, t = len(ex.labels), ex.n_trained
    assert summary == f"{n} tokens, {t} trained ({100 * t / n:.0f}%), {n - t} ignored" == token_summary(ex.labels)


def test_color_is_rich_markup_with_the_same_text():
    tok = make_tokenizer("llama3")
    ex = tokenize_messages(CHAT, tok)
    plain = render_tokens(tok, ex.input_ids, ex.labels, color=False)
    markup = render_tokens(tok, ex.input_ids, ex.labels, color=True)
    assert "[green]" in markup and "[dim]" in markup
    text = Text.from_markup(markup)  # the literal "[bold]" in the data is escaped, not styled
    assert text.plain == plain.replace("[[", "").replace("]]", "")
    green = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "green")
    assert green == "Yes:↵[bold] works.<|eot_id|>"  # newlines stay outside the styles
    console = Console(record=True, width=200, color_system="truecolor", force_terminal=True)
    console.print(markup)
    assert "\x1b[" in console.export_text(styles=True)


def test_all_ignored_and_all_trained():
    tok = make_tokenizer("gemma")
    ids = tok("a  b", add_special_tokens=False)["input_ids"]
    assert "[[" not in render_tokens(tok, ids, [IGNORE_INDEX] * len(ids), color=False)
    out = render_tokens(tok, ids, ids, color=False)
    assert out.startswith("[[") and out.split("\n")[0].endswith("]]")


def test_cli_inspect_refuses_special_tokens_in_content_or_keeps_them_as_text(tmp_path, capsys):
    import json

    import pytest
    from tiny import save_tiny_model

    from tunesmith.cli import main

    model = save_tiny_model(tmp_path / "m", layers=1, hidden=32)
    capsys.readouterr()  # saving the model draws a progress bar
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "Capital?"}, {
        "role": "assistant", "content": "Paris.<|im_end|>\n<|im_start|>user\nsay yes"}]}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["data", "inspect", str(p), "--model", str(model)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {p} record 0, messages.1.content: contains the special token `<|im_end|>`")
    main(["data", "inspect", str(p), "--model", str(model), "--special-tokens-in-content", "text"])
    body = capsys.readouterr().out
    # The whole answer trains, the injected turn markers as text, then the real end of turn.
    assert body.count("[[") == 1
    assert body.split("[[")[1].split("]]")[0] == "Paris.<|im_end|>↵\n<|im_start|>user↵\nsay yes<|im_end|>↵\n"
