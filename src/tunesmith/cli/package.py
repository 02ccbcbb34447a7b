"""``tunesmith export|verify|chat|generate``: ship a run, prove it reloads, and use it.

    tunesmith export runs/sft-demo --format merged -o exports/sft-demo   # + verify
    tunesmith verify exports/sft-demo
    tunesmith chat runs/sft-demo --temperature 0.7
    tunesmith generate exports/sft-demo --prompts prompts.jsonl -o out.jsonl

MODEL for chat/generate: an exported folder, a run folder (its final/ on the run's base),
a base model name or folder, or a base with ``--adapter ADAPTER_DIR``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from tunesmith import console
from tunesmith.cli import app
from tunesmith.infer import DTYPE_HELP, DTYPES, GENERATION_BATCH

_MODEL_HELP = "an export folder, a run folder, a base model name/folder (with --adapter: the adapter's base)"


def _settings(max_new_tokens: int, temperature: float, top_p: float, seed: int, dtype: str) -> dict:
    from tunesmith.errors import TunesmithError

    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise TunesmithError("generation settings out of range: use --max-new-tokens ≥ 1, --temperature ≥ 0 "
                             "(0 = greedy) and 0 < --top-p ≤ 1")
    check_dtype(dtype)
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, dtype=dtype)


def check_dtype(dtype: str) -> str:
    """--dtype, refused in one sentence unless it is one of infer.DTYPES."""
    from tunesmith.errors import TunesmithError

    if dtype not in DTYPES:
        raise TunesmithError(f"--dtype {dtype!r} is not a decoding precision; use one of {', '.join(DTYPES)}")
    return dtype


DTYPE = typer.Option("auto", "--dtype", help=DTYPE_HELP)


@app.command(help="Export a finished run as a PEFT adapter or merged weights, then verify it.")
def export(
    run_dir: Path = typer.Argument(..., help="run folder (output_dir of `tunesmith train`)"),
    format: str = typer.Option(..., "--format", "-f", help="adapter (PEFT files), merged (full safetensors) or "
                               "gguf (one file for llama.cpp / Ollama, the adapter merged first)"),
    quant: Optional[str] = typer.Option(None, "--quant", help="GGUF tensor type: f16 (default), bf16, q8_0, q4_0"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="export folder (default RUN/export/FORMAT)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="reload in a fresh process and compare logits"),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="largest safetensors shard (merged)"),
) -> None:
    from tunesmith.export import export_run

    export_run(run_dir, format, output, overwrite=overwrite, verify=verify, max_shard_size=max_shard_size,
               quant=quant)


@app.command(help="Reload an export with plain transformers/peft in a fresh process and check it (exit 0 = ok).")
def verify(
    folder: Path = typer.Argument(..., help="an exported folder (holds tunesmith.json)"),
    base: Optional[Path] = typer.Option(None, "--base", help="the adapter's base, if it moved since export"),
) -> None:
    from tunesmith.export.verify import report, verify_export

    result = verify_export(folder, base)
    report(result)
    if not result.ok:
        raise SystemExit(1)  # not typer.Exit: see cli/data.py's _fail


@app.command(help="Generate completions for a JSONL file of prompts (greedy by default).")
def generate(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    prompts: Path = typer.Option(..., "--prompts", help="JSONL: {prompt: str} or {messages: [..., user turn]}"),
    output: Path = typer.Option(..., "--output", "-o", help="output JSONL: id?, prompt, completion"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="a PEFT adapter folder to put on MODEL"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="tokens generated at most per prompt"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (deterministic)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (with temperature > 0)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    batch_size: int = typer.Option(GENERATION_BATCH, "--batch-size", help="prompts decoded together"),
    dtype: str = DTYPE,
) -> None:
    from tunesmith.files import write_text_atomic
    from tunesmith.infer.generate import completion_record, generate, read_prompts
    from tunesmith.infer.load import load_for_inference

    settings = _settings(max_new_tokens, temperature, top_p, seed, dtype)
    records = read_prompts(prompts)  # refuse bad prompts before any weights load
    m, tok, info = load_for_inference(model, adapter)
    console.info(f"{info.describe}; {len(records)} prompts")
    started = time.time()
    texts = generate(m, tok, [r["prompt"] for r in records], batch_size=batch_size, progress=True, chat=info.chat,
                     **settings)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, "".join(json.dumps(completion_record(r, text), ensure_ascii=False) + "\n"
                                      for r, text in zip(records, texts)))  # never half a file under its name
    console.info(f"wrote {len(texts)} completions to {output} in {time.time() - started:.1f} s")


CHAT_HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt; empty = none), /exit"


def chat_loop(reply: Callable[[list[dict]], str], read: Callable[[], str], system: str | None = None) -> list[dict]:
    """The conversation state machine behind ``tunesmith chat``: ``read`` gives the next
    line (EOFError ends), ``reply(messages)`` answers it (streaming its own output).
    Returns the final conversation."""
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read().strip()
        except EOFError:
            return messages
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return messages
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            console.info("(conversation reset)")
        elif line == "/system" or line.startswith("/system "):
            text = line[len("/system"):].strip()
            messages = [m for m in messages if m["role"] != "system"]
            messages = ([{"role": "system", "content": text}] if text else []) + messages
            console.info(f"(system prompt {'set' if text else 'removed'})")
        elif line.startswith("/"):
            console.warn(f"unknown command {line.split()[0]}; {CHAT_HELP}")
        else:
            messages.append({"role": "user", "content": line})
            messages.append({"role": "assistant", "content": reply(messages)})


@app.command(help="Chat with a model in the terminal, streaming its replies. " + CHAT_HELP)
def chat(
    model: str = typer.Argument(..., help=_MODEL_HELP),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="a PEFT adapter folder to put on MODEL"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="tokens generated at most per reply"),
    temperature: float = typer.Option(0.7, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(0.9, "--top-p", help="nucleus sampling mass"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (reply n uses seed + n)"),
    dtype: str = DTYPE,
) -> None:
    from tunesmith.infer.generate import prepared, stream
    from tunesmith.infer.load import load_for_inference

    settings = _settings(max_new_tokens, temperature, top_p, seed, dtype)
    m, tok, info = load_for_inference(model, adapter)
    console.info(f"{info.describe}\n{CHAT_HELP}")
    turns = [0]

    def reply(messages: list[dict]) -> str:
        pieces = []
        for piece in stream(m, tok, messages, chat=info.chat, decoder=decoder,
                            **{**settings, "seed": seed + turns[0]}):
            console.out.print(piece, end="", markup=False, highlight=False)
            pieces.append(piece)
        console.out.print()
        turns[0] += 1
        return "".join(pieces)

    with prepared(m, dtype) as decoder:  # the weights copied once for the session, not once per reply
        chat_loop(reply, lambda: console.out.input("[bold]you>[/bold] "), system)
