"""``tunesmith data check|convert|inspect|curate``: look at a dataset before training on it, and clean it.

    tunesmith data check data/train.jsonl                       # formats, errors, duplicates
    tunesmith data check data/train.jsonl --max-length 1024     # + token lengths (default model)
    tunesmith data convert raw.json -o data/clean.jsonl --split 0.1
    tunesmith data inspect data/clean-train.jsonl --index 3     # which tokens train
    tunesmith data curate a.json b.json -o clean.jsonl --eval eval.jsonl   # dedup, decontaminate, filter
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunesmith import console
from tunesmith.errors import TunesmithError

app = typer.Typer(help="Check, convert and inspect datasets.", no_args_is_help=True)

DEFAULT_MODEL = "smollm2-135m-instruct"

_FORMAT_HELP = ("Skip detection and read every record as this format: alpaca, prompt_response, text, "
                "openai_messages, sharegpt, preference, sharegpt_preference, unpaired, prompt_only, canonical.")
_SPECIAL_HELP = ("A special token such as <|im_end|> inside a record's text: 'error' reports it (it would become a "
                 "control token), 'text' keeps it as plain text (as data.special_tokens_in_content: text).")
_COLUMNS_HELP = ("Map unusual column names, e.g. 'prompt=q,response=a' (targets: prompt, response, "
                 "instruction, input, output, system, messages, conversations, chosen, rejected, label, "
                 "text, tools, history).")


def _fail() -> None:
    # SystemExit, not typer.Exit: the root app runs click with standalone_mode=False,
    # which turns typer.Exit into a return value and would lose the exit code.
    raise SystemExit(1)


def _columns(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, sep, src = part.partition("=")
        if not sep or not name.strip() or not src.strip():
            raise TunesmithError(f"--columns: {part!r} is not NAME=COLUMN; write e.g. 'prompt=q,response=a'")
        out[name.strip()] = src.strip()
    return out


def _special(value: str) -> str:
    if value not in ("error", "text"):
        raise TunesmithError(f"--special-tokens-in-content {value!r} is not a choice; use error or text")
    return value


_TEMPLATE_HELP = "Chat template override: a Jinja file or a family (chatml, llama3, gemma, mistral, qwen3)."
_REASONING_HELP = "Reasoning traces: train (with the answer), answer_only (context, -100) or drop."
_KWARGS_HELP = "Chat template switches as a JSON object, e.g. '{\"enable_thinking\": false}'."


def _tokenizer(model: str | None, chat_template: str | None = None):
    from tunesmith.models import load_tokenizer  # lazy: checking data needs no model

    return load_tokenizer(model or DEFAULT_MODEL, chat_template)


def _chat(reasoning: str, template_kwargs: str | None):
    """data.reasoning and data.template_kwargs from the command line."""
    from tunesmith.data.render import REASONING, ChatOptions

    if reasoning not in REASONING:
        raise TunesmithError(f"--reasoning {reasoning!r} is not a choice; use {', '.join(REASONING)}")
    kwargs = {}
    if template_kwargs:
        try:
            kwargs = json.loads(template_kwargs)
        except json.JSONDecodeError as e:
            raise TunesmithError(f"--template-kwargs is not JSON ({e.msg}); write e.g. "
                                 "'{\"enable_thinking\": false}'") from None
        if not isinstance(kwargs, dict):
            raise TunesmithError("--template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    return ChatOptions(reasoning, kwargs)


@app.command()
def check(
    files: list[Path] = typer.Argument(..., help="Data files: .jsonl, .json, .csv or .parquet."),
    model: str = typer.Option(None, "--model", help=f"Tokenizer for token statistics (default {DEFAULT_MODEL})."),
    max_length: int = typer.Option(None, "--max-length", help="Count records and trained tokens cut at this "
                                   "length (tokens). Token statistics run only with --model or --max-length."),
    format: str = typer.Option(None, "--format", help=_FORMAT_HELP),
    columns: str = typer.Option(None, "--columns", help=_COLUMNS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON on stdout."),
    special_tokens_in_content: str = typer.Option("error", "--special-tokens-in-content", help=_SPECIAL_HELP),
    chat_template: str = typer.Option(None, "--chat-template", help=_TEMPLATE_HELP),
    reasoning: str = typer.Option("train", "--reasoning", help=_REASONING_HELP),
    template_kwargs: str = typer.Option(None, "--template-kwargs", help=_KWARGS_HELP),
) -> None:
    """Report records, format, kind, every problem as file:line:field, duplicates and token lengths.

    Exit code 0 when no errors were found (warnings such as duplicates allowed), 1 otherwise.
    Special tokens inside the text are found with a tokenizer only (--model or --max-length).
    """
    from tunesmith.data.validate import check_files, render_report

    if max_length is not None and max_length < 1:
        raise TunesmithError(f"--max-length must be a positive number of tokens, got {max_length}")
    special, chat = _special(special_tokens_in_content), _chat(reasoning, template_kwargs)
    tokenizer = _tokenizer(model, chat_template) if (model or max_length or chat_template) else None
    report = check_files(files, format=format, columns=_columns(columns), tokenizer=tokenizer,
                         max_length=max_length, special_tokens_in_content=special, chat=chat)
    if as_json:
        # markup/emoji off: record text such as "[b]" or ":smile:" must come out verbatim.
        console.out.print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2),
                          markup=False, highlight=False, emoji=False, soft_wrap=True)
    else:
        console.out.print(render_report(report))
    if not report.ok:
        _fail()


def _split_paths(output: Path) -> tuple[Path, Path]:
    return (output.with_name(f"{output.stem}-train{output.suffix}"),
            output.with_name(f"{output.stem}-eval{output.suffix}"))


@app.command()
def convert(
    file: Path = typer.Argument(..., help="Source data file: .jsonl, .json, .csv or .parquet."),
    output: Path = typer.Option(..., "-o", "--output", help="Canonical JSONL to write (OUT.jsonl). With "
                                "--split, writes OUT-train.jsonl and OUT-eval.jsonl beside it instead."),
    split: float = typer.Option(None, "--split", help="Fraction held out for evaluation, e.g. 0.1."),
    seed: int = typer.Option(0, "--seed", help="Seed of the deterministic split."),
    format: str = typer.Option(None, "--format", help=_FORMAT_HELP),
    columns: str = typer.Option(None, "--columns", help=_COLUMNS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Write the dataset in tunesmith's canonical JSONL (refuses if any record has a problem)."""
    from tunesmith.data.validate import check_files, split_records, summarise, write_jsonl

    if output.suffix != ".jsonl":
        raise TunesmithError(f"--output {output} must end in .jsonl (canonical JSON Lines)")
    outs = _split_paths(output) if split is not None else (output,)
    for p in outs:
        if p.exists() and not overwrite:
            raise TunesmithError(f"{p} already exists; pass --overwrite to replace it")
    report = check_files([file], format=format, columns=_columns(columns))
    if not report.ok:
        raise summarise(report.errors, [str(file)])
    f = report.files[0]
    records = [rec for _, rec in f.entries]
    if f.duplicates:
        console.warn(f"{file}: {len(f.duplicates)} duplicate record(s) kept; "
                     f"`tunesmith data check {file}` lists them")
    parts = split_records(records, split, seed) if split is not None else (records,)
    for p, recs in zip(outs, parts):
        write_jsonl(recs, p)
        console.info(f"wrote {len(recs)} {f.kind} record(s) ({f.format} → canonical) to {p}")


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="Data file to read (any supported format)."),
    index: int = typer.Option(0, "--index", help="0-based record number (not the line number)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model whose tokenizer and chat template to use."),
    max_length: int = typer.Option(None, "--max-length", help="Truncate as training would (tokens)."),
    format: str = typer.Option(None, "--format", help=_FORMAT_HELP),
    columns: str = typer.Option(None, "--columns", help=_COLUMNS_HELP),
    special_tokens_in_content: str = typer.Option("error", "--special-tokens-in-content", help=_SPECIAL_HELP),
    chat_template: str = typer.Option(None, "--chat-template", help=_TEMPLATE_HELP),
    reasoning: str = typer.Option("train", "--reasoning", help=_REASONING_HELP),
    template_kwargs: str = typer.Option(None, "--template-kwargs", help=_KWARGS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print every training sequence of the record as JSON: "
                                 "input_ids, labels and the decoded text of each trained span."),
) -> None:
    """Show one record tokenised: trained tokens coloured (or wrapped in [[ ]] when piped).

    A conversation under a chat template that rewrites earlier turns (Qwen3, gpt-oss, …) is
    one training sequence per assistant turn: each is shown."""
    from tunesmith.data.validate import load_records

    special, chat = _special(special_tokens_in_content), _chat(reasoning, template_kwargs)
    records = load_records(file, format=format, columns=_columns(columns))
    if not 0 <= index < len(records):
        raise TunesmithError(f"--index {index} is out of range; {file} holds {len(records)} record(s) "
                             f"(0 to {len(records) - 1})")
    tokenizer = _tokenizer(model, chat_template)
    shown, mode = _sequences(records[index], tokenizer, max_length, special, chat, f"{file} record {index}")
    if as_json:
        from tunesmith.data.inspect import trained_spans

        out = {"file": str(file), "index": index, "mode": mode, "sequences": [
            {"name": name, "input_ids": ex.input_ids, "labels": ex.labels, "truncated": ex.truncated,
             "trained": [tokenizer.decode(span, skip_special_tokens=False) for span in trained_spans(ex.labels)]}
            for name, ex in shown]}
        console.out.print(json.dumps(out, ensure_ascii=False), markup=False, highlight=False, emoji=False,
                          soft_wrap=True)
        return
    from tunesmith.data.inspect import render_tokens

    color = console.is_tty()
    for name, ex in shown:
        cut = f", truncated from {ex.n_tokens}" if ex.truncated else ""
        console.info(f"{file} record {index} ({name}): {len(ex.input_ids)} tokens{cut}, {ex.n_trained} trained")
        text = render_tokens(tokenizer, ex.input_ids, ex.labels, color=color)
        # With colour the renderer returns rich markup; without, plain text with [[ ]].
        console.out.print(text, markup=color, highlight=False, emoji=False)


def _sequences(rec: dict, tokenizer, max_length, special: str, chat, where: str) -> tuple[list, str]:
    """[(name, TokenizedExample)] of one record as training sees it, and the template mode."""
    from tunesmith.data.special_tokens import SpecialTokenError
    from tunesmith.data.tokenize import training_sequences

    try:
        shown, conv = training_sequences(rec, tokenizer, max_length=max_length, special_tokens_in_content=special,
                                         chat=chat)
    except SpecialTokenError as e:
        raise TunesmithError(f"{where}, {e.field}: {e.reason} (or pass --special-tokens-in-content text)") from None
    return shown, conv.mode if conv is not None else "append"


def _builtin_suites() -> list[str]:
    """tunesmith's own evaluation suites (their prompts must not be trained on either)."""
    from tunesmith.evaluate.scoring import BUILTIN_SUITES, SUITE_DIR

    return [str(SUITE_DIR / f"{name}.jsonl") for name in BUILTIN_SUITES]


def _curate_config(path: Path | None, overrides: dict):
    import yaml

    from tunesmith.data.curate import config_from

    raw = {}
    if path is not None:
        if not path.is_file():
            raise TunesmithError(f"--config {path} does not exist; check the path")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise TunesmithError(f"--config {path} must be a YAML mapping of curate settings")
    return config_from({**raw, **{k: v for k, v in overrides.items() if v is not None}}, f"--config {path}"
                       if path is not None else "curate")


@app.command()
def curate(
    files: list[Path] = typer.Argument(None, help="Data files to curate together (one kind of record); "
                                       "or list them in the config's mix."),
    output: Path = typer.Option(..., "-o", "--output", help="Curated canonical JSONL (OUT.jsonl); beside it "
                                "OUT.removed.jsonl, OUT.report.json and OUT.report.html."),
    eval_files: list[Path] = typer.Option([], "--eval", help="Evaluation files whose prompts and answers must not "
                                          "leak into training (repeat for several)."),
    config: Path = typer.Option(None, "--config", help="YAML of curate settings (see data/curate.py CurateConfig)."),
    builtin_suites: bool = typer.Option(True, "--builtin-suites/--no-builtin-suites",
                                        help="Also decontaminate against tunesmith's own eval suites."),
    pii: str = typer.Option(None, "--pii", help="PII in kept records: flag (default), mask, remove or off."),
    jaccard: float = typer.Option(None, "--jaccard", help="Near-duplicate threshold (default 0.8)."),
    split: float = typer.Option(None, "--split", help="Fraction held out for evaluation, stratified by source "
                                "(and KTO label): OUT-train.jsonl and OUT-eval.jsonl."),
    model: str = typer.Option(None, "--model", help="The tokenizer and chat template to count tokens with: "
                              "the report's token lengths, and --max-length."),
    max_length: int = typer.Option(None, "--max-length", help="Remove records longer than this many tokens "
                                   "(untruncated) under --model (default model when omitted)."),
    languages: str = typer.Option(None, "--languages", help="Keep only records in these languages (ISO 639-1, "
                                  "comma-separated, e.g. en,de); needs tunesmith[curate]."),
    workers: int = typer.Option(None, "--workers", help="Processes analysing records (default: every core); "
                                "the output does not depend on it."),
    format: str = typer.Option(None, "--format", help=_FORMAT_HELP),
    columns: str = typer.Option(None, "--columns", help=_COLUMNS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Deduplicate (exact, near), decontaminate against eval files, filter empty, repetitive and
    refusal responses, other languages, over-long records and PII; split and mix (the config's
    mix: [{path, weight|count}]); every removed record lands in OUT.removed.jsonl with why."""
    from tunesmith.data.curate import curate as run_curate

    if output.suffix != ".jsonl":
        raise TunesmithError(f"--output {output} must end in .jsonl (canonical JSON Lines)")
    from tunesmith.data.curate import outputs

    langs = [x.strip() for x in languages.split(",") if x.strip()] if languages else None
    cfg = _curate_config(config, {"pii": pii, "jaccard": jaccard, "split": split, "max_length": max_length,
                                  "languages": langs})
    for p in outputs(output, cfg.split > 0).values():
        if p.exists() and not overwrite:
            raise TunesmithError(f"{p} already exists; pass --overwrite to replace it")
    tokenizer = _tokenizer(model) if cfg.max_length or model else None  # token lengths in the report too
    result = run_curate([str(f) for f in files or []], output, eval_files=[str(p) for p in eval_files],
                        suite_files=_builtin_suites() if builtin_suites else [], cfg=cfg, tokenizer=tokenizer,
                        workers=workers, format=format, columns=_columns(columns))
    rep = result.report
    if as_json:
        console.out.print(json.dumps(rep, ensure_ascii=False, indent=2), markup=False, highlight=False, emoji=False,
                          soft_wrap=True)
        return
    rules = ", ".join(f"{k} {v}" for k, v in rep["removed_by_rule"].items() if v) or "nothing"
    pii_note = {"flag": "carry PII (listed in the report)", "mask": "had PII, masked"}.get(cfg.pii)
    paths = outputs(output, cfg.split > 0)
    console.info(f"kept {rep['kept']} of {rep['records']} records; removed {rep['removed']} ({rules})"
                 + (f"; {rep['pii_flagged']} kept records {pii_note}" if pii_note else ""))
    if rep.get("mix"):
        console.info("mixed: " + ", ".join(f"{Path(k).name} {v['kept']} → {v['out']} ({v['asked']})"
                                           for k, v in rep["mix"].items()))
    if cfg.split > 0:
        console.info(f"split {rep['split']['train']} train → {paths['train']}, {rep['split']['eval']} eval → "
                     f"{paths['eval']} (stratified by source; train checked against the held-out part)")
    else:
        console.info(f"curated records: {paths['train']}")
    console.info(f"removed records with their evidence: {paths['removed']}; report: {paths['html']}")
