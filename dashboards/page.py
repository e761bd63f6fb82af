"""The report's page: its stylesheet, its small script, and the HTML around the sections.

No CDN and no fonts to fetch: the file opens offline, attached to an email or from an
MLflow artifact. The script sorts the trial table and links hovering across charts; it
marks ``<body data-rendered="ok">`` when it has run, and records script errors in
``data-errors``, so a headless browser can tell a working page from a broken one.
"""

from __future__ import annotations

from dashboards.svg import esc

CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --soft:#f9fafb; --accent:#047857; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1140px; margin: 0 auto; padding: 28px 30px 60px; }
h1 { font-size: 26px; margin: 0 0 2px; letter-spacing: -0.01em; }
h2 { font-size: 18px; margin: 38px 0 4px; padding-top: 16px; border-top: 1px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 4px; }
.sub { color: var(--muted); margin: 0 0 18px; }
.sub code { font-size: 12px; }
.caption { color: #374151; margin: 2px 0 12px; max-width: 900px; }
.note { color: var(--muted); font-style: italic; }
p.note { margin: 6px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px;
         margin: 16px 0; }
.card { border: 1px solid var(--line); border-radius: 10px; padding: 12px 16px; background: var(--soft); }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .d { color: var(--muted); font-size: 12px; }
.card.best .v { color: var(--accent); }
details.desc { color: #374151; margin: 6px 0; } details.desc p { margin: 6px 0; max-width: 900px; }
.legend { display: flex; flex-wrap: wrap; gap: 16px; margin: 4px 0 6px; color: #374151; font-size: 13px; }
.legend i { display: inline-block; width: 14px; height: 4px; border-radius: 2px; margin-right: 6px;
            vertical-align: middle; }
.legend i.dash { background: repeating-linear-gradient(90deg, currentColor 0 6px, transparent 6px 10px);
                 height: 3px; }
.grid-3 { display: flex; flex-wrap: wrap; gap: 6px 12px; }
svg.chart { display: block; max-width: 100%; height: auto; overflow: visible; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
           fill: #374151; }
svg .label { font-size: 12px; fill: #111827; }
svg[data-chart=parallel] .tick { paint-order: stroke; stroke: #fff; stroke-width: 3px; }
svg .note { font-size: 11px; fill: #92400e; font-style: italic; }
svg .callout { font-size: 12px; font-weight: 650; fill: #047857; }
svg .grid { stroke: #eef0f3; } svg .axis { stroke: #9ca3af; }
svg .rung { stroke: #f59e0b; stroke-dasharray: 4 4; stroke-width: 1.2; }
svg .curve { stroke-width: 1.8; stroke-linejoin: round; opacity: .85; }
svg .curve.best { stroke-width: 3.4; opacity: 1; }
svg .pc { stroke-width: 1.8; opacity: .8; } svg .pc.best { stroke-width: 3.6; opacity: 1; }
svg .cmp { stroke-width: 2.6; }
svg .dot { stroke: #fff; stroke-width: 1.2; } svg .dot.best { stroke: #047857; stroke-width: 2.5; }
svg .epoch-tick { stroke: #fff; stroke-width: 1.2; opacity: .9; }
svg .running { fill: #c7d2fe; stroke: #4f46e5; stroke-width: 1.5; }
svg .bar:hover, svg [data-trial]:hover { cursor: pointer; }
body.focus svg [data-trial]:not(.hl) { opacity: .12; }
body.focus svg [data-trial].hl { opacity: 1; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { position: sticky; top: 0; background: #f3f4f6; cursor: pointer; user-select: none; }
th:hover { background: #e5e7eb; }
th[aria-sort=ascending]::after { content: " \\25B2"; font-size: 10px; }
th[aria-sort=descending]::after { content: " \\25BC"; font-size: 10px; }
td.s, th.s { text-align: left; }
tr.hl td { background: #fef3c7; }
tr.best td { font-weight: 650; }
.pill { display: inline-block; padding: 0 8px; border-radius: 9px; font-size: 12px; color: #fff; }
.table-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table.cmp { width: auto; } table.cmp td:first-child { text-align: left; color: var(--muted); }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""

# Kept small on purpose: sorting, hover linking, and the two markers a test reads.
JS = """
(function () {
  function sortBy(th, dir) {
    var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
    var rows = Array.prototype.slice.call(body.rows);
    function key(row) {
      var cell = row.cells[col], v = cell.getAttribute('data-v');
      return v === null ? cell.textContent.trim() : (v === '' ? NaN : parseFloat(v));
    }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (typeof x === 'number' || typeof y === 'number') {
        if (isNaN(x)) return 1; if (isNaN(y)) return -1;  // empty cells last either way
        return dir * (x - y);
      }
      return dir * String(x).localeCompare(String(y));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
  }
  document.querySelectorAll('table.sortable th').forEach(function (th) {
    th.addEventListener('click', function () {
      var dir = th.getAttribute('aria-sort') === 'descending' ? 1 :
                th.getAttribute('aria-sort') === 'ascending' ? -1 : (th.dataset.first === 'asc' ? 1 : -1);
      sortBy(th, dir);
    });
  });
  function light(trial, on) {
    document.body.classList.toggle('focus', on);
    document.querySelectorAll('[data-trial="' + trial + '"]').forEach(function (el) {
      el.classList.toggle('hl', on);
    });
  }
  document.querySelectorAll('[data-trial]').forEach(function (el) {
    el.addEventListener('mouseenter', function () { light(el.dataset.trial, true); });
    el.addEventListener('mouseleave', function () { light(el.dataset.trial, false); });
  });
  var first = document.querySelector('table.sortable th[data-initial]');
  if (first) sortBy(first, -1);  // best val_acc first
  document.body.dataset.rendered = 'ok';
})();
"""

ONERROR = ("<script>window.onerror = function (msg, src, line) { var b = document.body;"
           " b.dataset.errors = (b.dataset.errors || '') + msg + ' (line ' + line + '); '; };</script>")


def document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
            f"<body>{ONERROR}<main>\n{body}\n</main><script>{JS}</script></body></html>\n")


def section(anchor: str, title: str, caption: str, *content: str) -> str:
    cap = f'<p class="caption">{caption}</p>' if caption else ""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{cap}{"".join(content)}</section>\n'


def legend(items: list[tuple[str, str, bool]]) -> str:
    """[(label, colour, dashed)] as a line of swatches."""
    def swatch(colour: str, dashed: bool) -> str:
        style = f"color:{colour}" if dashed else f"background:{colour}"
        return f'<i class="{"dash" if dashed else ""}" style="{style}"></i>'

    spans = "".join(f"<span>{swatch(c, d)}{esc(label)}</span>" for label, c, d in items)
    return f'<div class="legend">{spans}</div>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'
