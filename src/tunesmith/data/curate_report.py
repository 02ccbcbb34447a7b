"""The curation report as one self-contained HTML page (no script, no fetch: inline CSS bars).

``render_curation(report)`` takes ``data.curate.summary``'s dict: counts per rule, examples
with their evidence, word-length and turn histograms before and after, the source mix.
"""

from __future__ import annotations

import html
import json

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
{_before_after("User turns per record", report["turns"])}
<h2>Examples</h2>{examples or "<p>nothing removed</p>"}
<h2>Settings</h2><pre>{_e(json.dumps(report["config"], indent=1))}</pre>
<p>Eval files checked: {_e(", ".join(report["eval_files"]) or "none")}</p>
</body></html>
"""
