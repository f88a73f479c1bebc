"""The dashboard's pages: server-rendered HTML (jinja2, autoescaped), no build step.

``/`` lists the jobs (state, a progress bar, requests done/total, cost estimate/actual/saving, age,
errors) and draws the cost per day and model as an inline SVG; ``/jobs/<id>`` shows a job's chunks,
remote batches, events and links to its outbox files. Parts marked ``data-refresh`` are fetched
again every :data:`REFRESH_SECONDS` by a small inline script (``?part=…`` answers the fragment alone),
so a running job's progress moves without a reload. With ``http_token`` configured the pages show
cancel/approve/retry buttons; a button POSTs with the token typed into the page's token field (kept
in the tab's sessionStorage, never in a page the server renders).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from batchd.views import job_state, job_view

#: Seconds between refreshes of a page's live parts.
REFRESH_SECONDS = 1.0
#: Jobs listed on the dashboard: every unfinished one, and the latest finished ones up to this many.
MAX_JOBS = 200
#: Days of cost the chart covers.
CHART_DAYS = 30
#: Files listed per job (its outbox folder, one level of subfolders).
MAX_FILES = 200

_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7"]

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{% block title %}batchd{% endblock %}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%;margin-bottom:1.5em}
th,td{border-bottom:1px solid #ddd;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
.bar{background:#eee;border-radius:3px;width:10em;height:.9em;display:inline-block;vertical-align:middle}
.bar>span{background:#4e79a7;display:block;height:100%;border-radius:3px}
.state-failed,.state-rejected,.error{color:#b00020}.state-succeeded{color:#1b7a1b}.state-partial{color:#a06000}
.muted{color:#777}header{display:flex;gap:1em;align-items:baseline}
code{font-size:90%}
</style></head><body>
<header><h1><a href="/">batchd</a></h1>{% block header %}{% endblock %}
{% if actions %}<label>token <input id="token" type="password" autocomplete="off" size="16"></label>
<span id="action-result" role="status"></span>{% endif %}</header>
{% block body %}{% endblock %}
<script nonce="{{ nonce }}">
(function () {
  var every = {{ refresh_ms }};
  function refresh() {
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      fetch(el.getAttribute("data-refresh"), {cache: "no-store"}).then(function (r) {
        return r.ok ? r.text() : null;
      }).then(function (html) { if (html !== null && el.innerHTML !== html) el.innerHTML = html; })
        .catch(function () {});
    });
  }
  setInterval(refresh, every);
  var token = document.getElementById("token");
  if (token) {
    token.value = sessionStorage.getItem("batchd-token") || "";
    token.addEventListener("change", function () { sessionStorage.setItem("batchd-token", token.value); });
    document.addEventListener("click", function (event) {
      var button = event.target.closest("button[data-verb]");
      if (!button) return;
      var out = document.getElementById("action-result");
      fetch("/api/jobs/" + encodeURIComponent(button.dataset.job) + "/" + button.dataset.verb, {
        method: "POST", headers: {"Authorization": "Bearer " + token.value}
      }).then(function (r) { return r.json(); }).then(function (answer) {
        out.textContent = answer.message || answer.error || "";
        refresh();
      }).catch(function (e) { out.textContent = String(e); });
    });
  }
})();
</script>
</body></html>
"""

_JOBS = """<table id="jobs"><thead><tr><th>job</th><th>task</th><th>state</th><th>progress</th><th>requests</th>
<th>cost (estimate / actual / saving)</th><th>age</th><th>error</th>{% if actions %}<th></th>{% endif %}</tr></thead>
<tbody>
{% for job in jobs %}<tr class="job" data-job="{{ job.id }}">
<td><a href="/jobs/{{ job.id }}">{{ job.name }}</a><br><span class="muted">{{ job.id }}</span></td>
<td>{{ job.task or "" }}<br><span class="muted">{{ job.model or "" }}</span></td>
<td class="state state-{{ job.outcome or job.state }}">{{ job.shown_state }}</td>
<td><span class="bar" title="{{ job.percent }}%"><span style="width:{{ job.percent }}%"></span></span>
<span class="percent">{{ job.percent }}%</span></td>
<td class="requests">{{ job.done }} / {{ job.requests }}</td>
<td class="cost">{{ job.money.estimate }} / {{ job.money.actual }} / {{ job.money.saving }}</td>
<td>{{ job.age }}</td>
<td class="error">{{ job.error_text }}</td>
{% if actions %}<td>{% for verb in job.verbs %}<button data-verb="{{ verb }}" data-job="{{ job.name }}">{{ verb }}</button>
{% endfor %}</td>{% endif %}
</tr>{% else %}<tr><td colspan="9" class="muted">no jobs yet</td></tr>{% endfor %}
</tbody></table>"""

_CHART = """<figure id="cost-chart"><figcaption>cost per day and model ({{ chart.currency }}, last {{ chart.days }}
days)</figcaption>{{ chart.svg | safe }}</figure>"""

_INDEX = """{% extends "base" %}{% block body %}
<section data-refresh="/?part=jobs">{% include "jobs" %}</section>
<section data-refresh="/?part=chart">{% include "chart" %}</section>
{% endblock %}"""

_JOB_BODY = """<h2>{{ job.name }} <span class="state state-{{ job.outcome or job.state }}">{{ job.shown_state }}</span></h2>
<p><span class="bar"><span style="width:{{ job.percent }}%"></span></span> <span class="requests">{{ job.done }} /
{{ job.requests }}</span> requests · {{ job.task or "" }} · {{ job.model or "" }} · cost {{ job.money.estimate }} /
{{ job.money.actual }} / {{ job.money.saving }} · {{ job.age }} old
{% if actions %}{% for verb in job.verbs %}<button data-verb="{{ verb }}" data-job="{{ job.name }}">{{ verb }}</button>
{% endfor %}{% endif %}</p>
{% if job.error_text %}<p class="error">{{ job.error_text }}</p>{% endif %}
{% if job.hold %}<p>held: {{ job.hold }}</p>{% endif %}
<h3>chunks</h3><table id="chunks"><thead><tr><th>chunk</th><th>mode</th><th>requests</th><th>state</th>
<th>remote batch</th><th>remote state</th><th>done</th><th>error</th></tr></thead><tbody>
{% for c in chunks %}<tr><td>{{ c.idx }}</td><td>{{ c.mode }}</td><td>{{ c.request_count }}</td><td>{{ c.state }}</td>
<td><code>{{ c.remote_name or "" }}</code></td><td>{{ c.remote_state or "" }}</td><td>{{ c.done }}</td>
<td class="error">{{ c.error_text }}</td></tr>{% endfor %}</tbody></table>
<h3>remote batches</h3><table id="remote"><thead><tr><th>name</th><th>chunk</th><th>role</th><th>outcome</th></tr></thead>
<tbody>{% for r in remote %}<tr><td><code>{{ r.remote_name }}</code></td><td>{{ r.chunk_idx }}</td><td>{{ r.role }}</td>
<td>{{ r.outcome or "" }}</td></tr>{% endfor %}</tbody></table>
<h3>events</h3><table id="events"><thead><tr><th>time</th><th>kind</th><th>details</th></tr></thead><tbody>
{% for e in events %}<tr><td>{{ e.time }}</td><td>{{ e.kind }}</td><td><code>{{ e.details }}</code></td></tr>{% endfor %}
</tbody></table>
<h3>outbox files</h3>{% if files %}<ul id="files">{% for f in files %}<li><a href="/files/{{ job.id }}/{{ f.path }}">{{ f.path
}}</a> <span class="muted">{{ f.size }} bytes</span></li>{% endfor %}</ul>{% else %}<p class="muted">not delivered
yet</p>{% endif %}"""

_JOB = """{% extends "base" %}{% block title %}{{ job.name }} · batchd{% endblock %}{% block body %}
<section data-refresh="/jobs/{{ job.id }}?part=job">{% include "job_body" %}</section>
{% endblock %}"""

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"base": _BASE, "jobs": _JOBS, "chart": _CHART, "index": _INDEX, "job": _JOB,
                              "job_body": _JOB_BODY}),
    autoescape=True, undefined=jinja2.StrictUndefined)


def render(template: str, **values: Any) -> str:
    return _ENV.get_template(template).render(refresh_ms=int(REFRESH_SECONDS * 1000), **values)


# -- what the pages show ----------------------------------------------------------------------------


def _money(value: Any, currency: str | None) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value:.6f} {currency or ''}".strip()


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def error_text(error: Any, limit: int = 500) -> str:
    if not error:
        return ""
    if isinstance(error, dict):
        text = str(error.get("message") or error.get("code") or error)
    else:
        text = str(error)
    return text if len(text) <= limit else text[:limit] + "…"


def verbs_for(view: dict) -> list[str]:
    state = view["state"]
    if state == "done":
        return ["retry"] if view.get("outcome") in ("partial", "failed") else []
    verbs = [] if view.get("cancel_requested") else ["cancel"]
    if state == "held":
        verbs.append("approve")
    return verbs


def shown_job(journal: Any, job: Any, now: float) -> dict:
    view = job_view(journal, job)
    cost = view.get("cost") or {}
    currency = cost.get("currency")
    view["money"] = {"estimate": _money(cost.get("estimate"), currency), "actual": _money(cost.get("actual"), currency),
                     "saving": _money(cost.get("saving"), currency)}
    view["percent"] = int(100 * view["done"] / view["requests"]) if view["requests"] else (
        100 if job.state == "done" else 0)
    view["age"] = _age(now - job.created_at)
    view["shown_state"] = job_state(view)
    view["error_text"] = error_text(job.error) or job_errors(journal, job)
    view["verbs"] = verbs_for(view)
    return view


def job_errors(journal: Any, job: Any) -> str:
    """What went wrong with a job that has no error of its own: its chunks' errors, remote batches that ended
    without results, and for a failed or partial job how many of its requests failed."""
    found = []
    for c in journal.chunks(job.id):
        if c.error:
            found.append(error_text(c.error))
        elif c.remote_state in ("failed", "expired", "missing", "rejected"):
            found.append(f"remote batch {c.remote_name} (chunk {c.idx}) ended {c.remote_state} with no results")
    if not found and job.outcome in ("failed", "partial"):
        last = journal.last_event(job.id, job.outcome)
        counts = (last[0].get("counts") if last else None) or {}
        if counts.get("failed"):
            found.append(f"{counts['failed']} of {counts.get('total', '?')} requests failed (results.jsonl)")
    return "; ".join(found[:3])


def recent_jobs(journal: Any, now: float) -> list[dict]:
    return [shown_job(journal, job, now) for job in journal.recent_jobs(done=MAX_JOBS, limit=2 * MAX_JOBS)]


def chunk_rows(journal: Any, job_id: str) -> list[dict]:
    rows = []
    for c in journal.chunks(job_id):
        done = c.request_count if c.state in ("fetched", "skipped") else \
            int(c.stats.get("successfulRequestCount", 0)) + int(c.stats.get("failedRequestCount", 0))
        rows.append({"idx": c.idx, "mode": c.mode, "request_count": c.request_count, "state": c.state,
                     "remote_name": c.remote_name, "remote_state": c.remote_state, "done": done,
                     "error_text": error_text(c.error)})
    return rows


def event_rows(journal: Any, job_id: str) -> list[dict]:
    rows = []
    for entry in journal.events(job_id)[-100:]:
        event = entry["event"]
        details = {k: v for k, v in event.items() if k in ("counts", "reason", "error") and v is not None}
        rows.append({"time": event.get("time") or "", "kind": event.get("kind"),
                     "details": error_text(json.dumps(details, default=str), 300) if details else ""})
    return rows


def outbox_files(outbox_dir: str | None) -> list[dict]:
    if not outbox_dir:
        return []
    root = Path(outbox_dir)
    if not root.is_dir():
        return []
    files = []
    for path in sorted(root.rglob("*")):
        if len(files) >= MAX_FILES:
            break
        relative = path.relative_to(root)
        if len(relative.parts) > 2 or path.is_symlink() or not path.is_file():
            continue
        files.append({"path": relative.as_posix(), "size": path.stat().st_size})
    return files


def cost_by_day(journal: Any, default_model: str, now: float) -> list[tuple[str, str, float]]:
    return journal.spend_by_day(default_model, now - CHART_DAYS * 86400)


def cost_chart(rows: list[tuple[str, str, float]], currency: str) -> dict:
    """A stacked bar per day (a colour per model) as inline SVG, with a legend."""
    days = sorted({day for day, _, _ in rows})
    models = sorted({model for _, model, _ in rows})
    width, height, left, bottom, top = 640, 220, 70, 30, 10
    if not rows:
        svg = (f'<svg id="cost-svg" xmlns="http://www.w3.org/2000/svg" width="{width}" height="60" role="img">'
               '<text x="10" y="30" fill="#777">no cost recorded yet</text></svg>')
        return {"svg": svg, "currency": currency, "days": CHART_DAYS}
    totals = {day: sum(a for d, _, a in rows if d == day) for day in days}
    peak = max(totals.values()) or 1.0
    step = (width - left - 10) / max(1, len(days))
    bar = min(40.0, max(4.0, step * 0.7))
    plot = height - bottom - top
    colour = {model: _PALETTE[i % len(_PALETTE)] for i, model in enumerate(models)}
    parts = [f'<svg id="cost-svg" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height + 20 * len(models)}" role="img" aria-label="cost per day and model">',
             f'<line x1="{left}" y1="{top + plot}" x2="{width - 10}" y2="{top + plot}" stroke="#999"/>',
             f'<text x="{left - 5}" y="{top + 10}" text-anchor="end" font-size="11">{peak:.4g}</text>',
             f'<text x="{left - 5}" y="{top + plot}" text-anchor="end" font-size="11">0</text>']
    for i, day in enumerate(days):
        x = left + i * step + (step - bar) / 2
        y = top + plot
        for model in models:
            amount = sum(a for d, m, a in rows if d == day and m == model)
            if amount <= 0:
                continue
            h = plot * amount / peak
            y -= h
            parts.append(f'<rect class="cost-bar" data-day="{_attr(day)}" data-model="{_attr(model)}" '
                         f'data-amount="{amount:.6f}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{colour[model]}"><title>{_text(day)} {_text(model)}: {amount:.6f} '
                         f'{_text(currency)}</title></rect>')
        parts.append(f'<text x="{x + bar / 2:.1f}" y="{top + plot + 15}" text-anchor="middle" '
                     f'font-size="10">{_text(day[5:])}</text>')
    for i, model in enumerate(models):
        y = height + 20 * i
        parts.append(f'<rect x="{left}" y="{y}" width="12" height="12" fill="{colour[model]}"/>'
                     f'<text class="legend" x="{left + 18}" y="{y + 11}" font-size="12">{_text(model)}</text>')
    parts.append("</svg>")
    return {"svg": "".join(parts), "currency": currency, "days": CHART_DAYS}


def _text(value: str) -> str:
    return str(markupsafe.escape(value))


def _attr(value: str) -> str:
    return str(markupsafe.escape(value))


def now() -> float:
    return time.time()
