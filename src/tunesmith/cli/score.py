"""``tunesmith score REWARD_MODEL --data FILE -o OUT.jsonl``: score records with a reward model."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunesmith import console
from tunesmith.cli import app


def _split(rec: dict) -> list[tuple[str, list[dict], list[dict]]]:
    """(name, prompt messages, response messages) to score in one record."""
    if "chosen" in rec:
        return [("chosen", rec["prompt"], rec["chosen"]), ("rejected", rec["prompt"], rec["rejected"])]
    if "completion" in rec:
        return [("", rec["prompt"], rec["completion"])]
    last = max(i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant")
    return [("", rec["messages"][:last], rec["messages"][last:])]


@app.command(help="Score prompt/response records or preference pairs with a trained reward model (JSONL out).")
def score(
    model: Path = typer.Argument(..., help="reward model: a `method: reward` run folder, its final/, or an export"),
    data: list[Path] = typer.Option(..., "--data", help="records: preference pairs, prompt/response or messages"),
    output: Path = typer.Option(..., "-o", "--output", help="JSONL with one line per record"),
    max_length: int = typer.Option(1024, help="longest sequence scored (the prompt is cut from the left first)"),
    batch_size: int = typer.Option(8, help="sequences per forward pass"),
) -> None:
    from tunesmith.data.validate import load_records, write_jsonl
    from tunesmith.infer.score import score_conversations
    from tunesmith.models.load import load_scorer
    from tunesmith.models.runs import weights_folder

    records = load_records(data, expect={"preference", "sft", "unpaired"}, purpose="scoring")
    reward_model, tok = load_scorer(weights_folder(model))
    parts = [(i, name, p, r) for i, rec in enumerate(records) for name, p, r in _split(rec)]
    # score_conversations takes assistant text; multi-message responses keep their final assistant text
    texts = [next(m["content"] for m in reversed(r) if m["role"] == "assistant") for _, _, _, r in parts]
    scores = score_conversations(reward_model, tok, [p for _, _, p, _ in parts], texts, max_length=max_length,
                                 batch_size=batch_size)
    rows: list[dict] = [{"index": i} for i in range(len(records))]
    for (i, name, _, _), s in zip(parts, scores):
        rows[i]["score_" + name if name else "score"] = s
        if "label" in records[i]:
            rows[i]["label"] = records[i]["label"]
    output.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, output)
    pairs = [r for r in rows if "score_chosen" in r]
    summary = f"scored {len(records)} records → {output}"
    if pairs:
        acc = sum(r["score_chosen"] > r["score_rejected"] for r in pairs) / len(pairs)
        summary += f"; pair accuracy {acc:.3f} ({len(pairs)} pairs)"
    console.info(summary)
    # markup off: the output path is user data ("runs/[x]" is a valid folder name).
    console.out.print(json.dumps({"records": len(records), "output": str(output),
                                  **({"pair_accuracy": acc} if pairs else {})}), markup=False, highlight=False)
