"""The curation report: what ``data curate`` counts as the records go by (``Counts``), the
JSON report of a run (``summary``), and that report as one self-contained HTML page
(``render_curation``; no script, no fetch: inline CSS bars) — counts per rule, examples with
their evidence, word-length, turn and language counts before and after, the source mix.
"""

from __future__ import annotations

import bisect
import html
import json
from collections import Counter

_LENGTHS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TURNS = (0, 1, 2, 3, 4, 6, 8, 12)


def _bucket(v: int, edges: tuple[int, ...]) -> str:
    i = bisect.bisect_right(edges, v) - 1
    return f"{edges[i]}+" if i == len(edges) - 1 else f"{edges[i]}-{edges[i + 1] - 1}"


def _histogram(counts: Counter, edges: tuple[int, ...]) -> dict[str, int]:
    return {_bucket(lo, edges): counts.get(_bucket(lo, edges), 0) for lo in edges}


class Counts:
    """Sources, word-length and turn buckets and languages of a set of records."""

    def __init__(self):
        self.sources, self.words, self.turns, self.languages = Counter(), Counter(), Counter(), Counter()
        self.tokens = Counter()

    def add(self, source: str, facts) -> None:  # a data.curate_rules.Facts
        self.sources[source] += 1
        self.words[_bucket(facts.words, _LENGTHS)] += 1
        self.turns[_bucket(facts.turns, _TURNS)] += 1
        if facts.tokens is not None:
            self.tokens[_bucket(facts.tokens, _LENGTHS)] += 1
        if facts.language is not None or facts.words:
            self.languages[facts.language or "undetermined"] += 1


def summary(decide, config: dict, rules: tuple[str, ...], inputs: list[str], eval_files: list[str]) -> dict:
    """The report of a curation's ``Decisions``: counts per rule and per source, examples,
    word-length, turn and language counts before and after (JSON-ready; ``render_curation``
    renders it)."""
    removed = sum(decide.rules.values())
    return {
        "inputs": inputs, "eval_files": eval_files, "config": config,
        "records": decide.records, "kept": decide.records - removed, "removed": removed,
        "removed_by_rule": {rule: decide.rules.get(rule, 0) for rule in rules},
        "pii_flagged": decide.pii_records, "pii_kinds": dict(decide.pii_kinds),
        "pii": decide.flagged,  # sources and counts (the first 50), not the values
        "sources": {"before": dict(decide.before.sources), "after": dict(decide.after.sources)},
        "examples": {rule: decide.examples[rule] for rule in rules if rule in decide.examples},
        "words": {"before": _histogram(decide.before.words, _LENGTHS), "after": _histogram(decide.after.words, _LENGTHS)},
        "turns": {"before": _histogram(decide.before.turns, _TURNS), "after": _histogram(decide.after.turns, _TURNS)},
        "tokens": ({"before": _histogram(decide.before.tokens, _LENGTHS), "after": _histogram(decide.after.tokens,
                                                                                            _LENGTHS)}
                   if decide.before.tokens else None),  # with a tokenizer (--model)
        "languages": ({"before": dict(decide.before.languages.most_common()),
                       "after": dict(decide.after.languages.most_common())} if config["languages"] else None),
    }


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}table{border-collapse:collapse;width:100%}
td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.bar{display:inline-block;height:.8em;background:#4a7bd0;margin-right:.4em}.after{background:#3a9a5b}
code,pre{font:12px/1.4 ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
.num{text-align:right;font-variant-numeric:tabular-nums}"""


def _e(x) -> str:
    return html.escape(str(x))


def _bars(counts: dict[str, int], cls: str = "") -> str:
    top = max(counts.values(), default=0) or 1
    return "".join(f"<tr><td>{_e(k)}</td><td class=num>{v}</td><td><span class='bar {cls}' "
                   f"style='width:{300 * v / top:.0f}px'></span></td></tr>" for k, v in counts.items())


def _before_after(title: str, pair: dict[str, dict[str, int]]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td class=num>{pair['before'].get(k, 0)}</td>"
                   f"<td class=num>{pair['after'].get(k, 0)}</td></tr>" for k in pair["before"])
    return f"<h2>{_e(title)}</h2><table><tr><th></th><th>before</th><th>after</th></tr>{rows}</table>"


def _reshaped(report: dict) -> str:
    """The split and the mix, when the curation made them."""
    out = ""
    if report.get("split"):
        s = report["split"]
        rows = "".join(f"<tr><td>{_e(k)}</td><td class=num>{v}</td></tr>" for k, v in s["by_source"].items())
        out += (f"<h2>Split</h2><p>{s['train']} train, {s['eval']} held out (per source below); train records "
                f"sharing a {report['config']['ngram']}-word span with a held-out one were removed as contaminated.</p><table id=split>{rows}</table>")
    if report.get("mix"):
        rows = "".join(f"<tr><td>{_e(k)}</td><td class=num>{v['kept']}</td><td>{_e(v['asked'])}</td>"
                       f"<td class=num>{v['out']}</td></tr>" for k, v in report["mix"].items())
        out += ("<h2>Mix</h2><table id=mix><tr><th>source</th><th>kept</th><th>asked</th><th>in the output</th></tr>"
                f"{rows}</table>")
    return out


def render_curation(report: dict) -> str:
    examples = "".join(
        f"<h3>{_e(rule)}</h3><table>" + "".join(
            f"<tr><td><code>{_e(x['source'])}</code></td><td><code>{_e(json.dumps(x['evidence'], ensure_ascii=False))}"
            f"</code></td></tr>" for x in items) + "</table>"
        for rule, items in report["examples"].items())
    sources = "".join(f"<tr><td>{_e(k)}</td><td class=num>{v}</td><td class=num>{report['sources']['after'].get(k, 0)}"
                      f"</td></tr>" for k, v in report["sources"]["before"].items())
    pii = "".join(f"<tr><td><code>{_e(x['source'])}</code></td><td>{_e(', '.join(f'{k} {v}' for k, v in x['pii'].items()))}"
                  f"{' (masked)' if x['masked'] else ''}</td></tr>" for x in report["pii"])
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>tunesmith data curate</title>
<style>{_STYLE}</style></head><body>
<h1>Curation: {report['kept']} of {report['records']} records kept</h1>
<p>{report['removed']} removed (every one in the <code>.removed.jsonl</code> beside the output, with its source
line, rule and evidence); {report['pii_flagged']} kept records carry PII
({_e(report['config']['pii'])}).</p>
<h2>Kept records with PII</h2><table id=pii>{pii or "<tr><td>none</td></tr>"}</table>
<h2>Removed, by rule</h2><table id=rules>{_bars(report["removed_by_rule"])}</table>
<h2>Sources</h2><table id=sources><tr><th>file</th><th>before</th><th>after</th></tr>{sources}</table>
{_before_after("Words per record", report["words"])}
{_before_after("Tokens per record (the model's chat template)", report["tokens"]) if report.get("tokens") else
 "<p>Token lengths: pass <code>--model</code> to count them.</p>"}
{_before_after("User turns per record", report["turns"])}
{_before_after("Languages", report["languages"]) if report.get("languages") else ""}
{_reshaped(report)}
<h2>Examples</h2>{examples or "<p>nothing removed</p>"}
<h2>Settings</h2><pre>{_e(json.dumps(report["config"], indent=1))}</pre>
<p>Eval files checked: {_e(", ".join(report["eval_files"]) or "none")}</p>
</body></html>
"""
