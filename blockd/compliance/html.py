"""The `--json` report document -> one self-contained HTML page: the order x operator matrix, a
timeline of time-to-enforce per operator, the operators' chains. Inline CSS and SVG only: no
script, font, image or stylesheet is fetched, so it opens offline and archives as one file.

Every cell links to the statement it rests on (the first that shows the order enforced, else the
latest), relative to the page, so the report and the statements can be moved together.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import Any

from blockd.compliance.report import verdict_line

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #bbb;padding:.3em .5em;vertical-align:top}
th{background:#eee;text-align:left}td.cell a{color:inherit;text-decoration:none;display:block}
.v-complies{background:#c8ecc8}.v-late,.v-missed,.v-disagrees,.v-no_statement{background:#f6c0c0}
.v-out_of_sync{background:#fbe0a0}.v-pending{background:#dde6f6}.v-refused{background:#e4e4e4}
.small{font-size:.85em;color:#444}.verdict{font-weight:bold;padding:.5em;border:2px solid #444;display:inline-block}
.ok{color:#176317}.bad{color:#a01010}ul.problems{margin:.2em 0 .2em 1.2em;padding:0}
svg text{font:11px system-ui,sans-serif}
"""


def _link(path: str | None, base: Path) -> str | None:
    if not path:
        return None
    try:
        rel = Path(os.path.relpath(path, base)).as_posix()
    except ValueError:
        return Path(path).resolve().as_uri()
    # Always a path, never read as a scheme: a statement named `javascript:….json` stays a file.
    return rel if rel.startswith("../") else f"./{rel}"


def _dur(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def _cell(c: dict[str, Any], base: Path) -> str:
    href = _link(c["evidence"] or c["latest"], base)
    title = "; ".join(c["problems"]) or c["verdict"]
    where = "+".join(c["where"])
    inner = (f"<b>{escape(c['verdict'])}</b><br><span class=small>{escape(where)} {escape(_dur(c['issued_to_enforced_s']))}"
             f"<br>deadline {escape(c['deadline_status'])}, in sync {escape(str(c['in_sync']).lower())}</span>")
    if href:
        inner = f'<a href="{escape(href)}">{inner}</a>'
    return (f'<td class="cell v-{escape(c["verdict"])}" id="cell-{escape(c["operator"])}-{escape(c["order"])}" '
            f'data-order="{escape(c["order"])}" data-operator="{escape(c["operator"])}" '
            f'data-verdict="{escape(c["verdict"])}" title="{escape(title)}">{inner}</td>')


def _timeline(doc: dict[str, Any], order: dict[str, Any], names: list[str]) -> str:
    """One bar per operator: issued -> first enforced; a red line at the deadline."""
    cells = {c["operator"]: c for c in doc["cells"] if c["order"] == order["key"] and c["serial"] == order["serial"]}
    spans = [c["issued_to_enforced_s"] for c in cells.values() if c["issued_to_enforced_s"] is not None]
    from datetime import datetime

    def t(s: str) -> datetime:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))

    deadline_s = (t(order["deadline"]) - t(order["issued_at"])).total_seconds() if order["deadline"] else None
    horizon = max([*spans, deadline_s or 0, 3600.0]) * 1.1
    width, left, row = 700, 110, 18
    height = row * len(names) + 24
    scale = (width - left - 90) / horizon
    parts = [f'<svg class="timeline" data-order="{escape(order["key"])}" width="{width}" height="{height}" '
             f'role="img" aria-label="time to enforce {escape(order["key"])}">']
    for i, name in enumerate(names):
        y = 4 + i * row
        c = cells.get(name)
        parts.append(f'<text x="0" y="{y + 12}">{escape(name)}</text>')
        if c and c["issued_to_enforced_s"] is not None:
            w = max(1.0, c["issued_to_enforced_s"] * scale)
            parts.append(f'<rect class="bar v-{escape(c["verdict"])}" data-operator="{escape(name)}" x="{left}" '
                         f'y="{y}" width="{w:.1f}" height="{row - 5}" fill="#5a8f5a"><title>{escape(name)}: '
                         f'{escape(_dur(c["issued_to_enforced_s"]))}</title></rect>'
                         f'<text x="{left + w + 4:.1f}" y="{y + 12}">{escape(_dur(c["issued_to_enforced_s"]))}</text>')
        else:
            label = c["verdict"] if c else "-"
            parts.append(f'<text x="{left}" y="{y + 12}" fill="#a01010">not enforced ({escape(label)})</text>')
    if deadline_s is not None:
        x = left + deadline_s * scale
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height - 14}" stroke="#c00" stroke-dasharray="4 2"/>'
                     f'<text x="{x + 3:.1f}" y="{height - 3}" fill="#c00">deadline {escape(_dur(deadline_s))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render(doc: dict[str, Any], *, base: Path) -> str:
    """`base`: the directory the page will live in (links to statements are relative to it)."""
    names = [o["name"] for o in doc["operators"]]
    cells = {(c["order"], c["serial"], c["operator"]): c for c in doc["cells"]}
    ok = doc["verdict"] == "comply"
    out = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
           "<meta name=viewport content='width=device-width'><title>blockd compliance report</title>",
           f"<style>{CSS}</style></head><body>",
           "<h1>Compliance with the orders, across operators</h1>",
           f'<p class="verdict {"ok" if ok else "bad"}" id="verdict" data-verdict="{escape(doc["verdict"])}">'
           f'{escape(verdict_line(doc))}</p>',
           f"<p class=small>generated {escape(doc['generated_at'])}; a latest statement older than "
           f"{doc['max_age_s'] / 3600:g} h is stale; expected rule set {escape(doc['expected']['ruleset_digest'][:16])}…</p>",
           "<h2>Orders x operators</h2><table id=matrix><tr><th>order</th><th>deadline</th>",
           *(f'<th data-operator="{escape(n)}">{escape(n)}</th>' for n in names), "</tr>"]
    for o in doc["orders"]:
        out.append(f'<tr data-order="{escape(o["key"])}"><th>{escape(o["key"])}<br><span class=small>'
                   f'serial {o["serial"]}, {escape(o["reference"])}, {o["rules"]} rules</span></th>'
                   f'<td class=small>{escape(o["deadline"] or "none")}</td>')
        out += [_cell(cells[(o["key"], o["serial"], n)], base) if (o["key"], o["serial"], n) in cells else "<td></td>"
                for n in names]
        out.append("</tr>")
    out.append("</table><h2>Time to enforce, from the order's issue</h2>")
    for o in doc["orders"]:
        out.append(f"<h3 class=small>{escape(o['key'])}</h3>{_timeline(doc, o, names)}")
    out.append("<h2>Operators</h2><table id=operators><tr><th>operator</th><th>complies</th><th>statements</th>"
               "<th>latest</th><th>problems</th></tr>")
    for op in doc["operators"]:
        href = _link(op["latest"], base)
        latest = escape(op["latest_at"] or "-")
        if href:
            latest = f'<a href="{escape(href)}">{latest}</a>'
        problems = "".join(f"<li>{escape(p)}</li>" for p in [*op["failing"], *op["problems"]])
        out.append(f'<tr data-operator="{escape(op["name"])}" data-complies="{str(op["complies"]).lower()}">'
                   f'<td>{escape(op["name"])}<br><span class=small>key {escape(op["key_id"])}</span></td>'
                   f'<td class="{"ok" if op["complies"] else "bad"}">{"yes" if op["complies"] else "no"}</td>'
                   f'<td>{op["statements"]} (seq {op["first_seq"]}..{op["last_seq"]})</td><td>{latest}</td>'
                   f'<td><ul class=problems>{problems}</ul></td></tr>')
    out.append("</table>")
    if doc["unattributed"] or doc["refused_inputs"]:
        out.append("<h2>Files not used</h2><ul>")
        out += [f"<li>{escape(f['path'])}: {escape(f['reason'])}</li>" for f in doc["unattributed"]]
        out += [f"<li>{escape(str(f['path']))}: {escape(str(f['error']))}</li>" for f in doc["refused_inputs"]]
        out.append("</ul>")
    out.append("</body></html>\n")
    return "\n".join(out)
