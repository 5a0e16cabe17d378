"""``python -m pipeline report OUT``: one static, self-contained HTML page of a dataset.

A table with a small JPEG thumbnail per row (a ``data:`` URI; nothing is fetched, http(s)
images are only linked), a "show only errors" filter, a search box and click-to-sort
headers, in inline JS and CSS. Rows are streamed from the Parquet parts in batches and
at most ``--limit`` rows are written, so memory stays bounded; the totals in the header
cover every row. Opening the page as ``report.html#selftest`` exercises the filter and
sorting and writes the results as JSON into ``<pre id=selftest>`` (used by the tests).
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from html import escape
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

WANTED = ["id", "prompt_name", "image", "status", "caption", "captions", "error",
          "error_class", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
          "latency_s", "attempts", "dedup_of"]
TOTALS = ["status", "error_class", "prompt_tokens", "completion_tokens", "cost_usd"]

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 8px}.totals span{margin-right:16px}
.run{background:#f4f4f8;padding:6px 10px;margin:8px 0;border-radius:4px}
.warn{background:#fff3cd;padding:6px 10px;margin:8px 0;border-radius:4px}
.controls{margin:10px 0}.controls input[type=search]{width:280px;margin-left:16px}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:4px 6px;
vertical-align:top;text-align:left}th{background:#eee;cursor:pointer;user-select:none;
position:sticky;top:0}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}td.n{text-align:right;white-space:nowrap}
td.cap{white-space:pre-wrap;max-width:480px}tr.error td{background:#fdeaea}
.ph{display:inline-block;background:#ddd;color:#666;font-size:11px;text-align:center}
.ec{font-weight:600}.err{white-space:pre-wrap;max-width:320px;color:#900}
.dup{color:#777;font-size:12px}img{display:block}td a{word-break:break-all}"""

JS = r"""(function(){
var tb=document.querySelector('#rows tbody'),rows=Array.prototype.slice.call(tb.rows);
var eo=document.getElementById('erronly'),q=document.getElementById('q'),
    shown=document.getElementById('shown'),ths=document.querySelectorAll('#rows thead th');
function apply(){var s=q.value.toLowerCase(),e=eo.checked,n=0;
 rows.forEach(function(r){var v=(!e||r.getAttribute('data-status')==='error')&&
  (!s||r.textContent.toLowerCase().indexOf(s)>=0);r.hidden=!v;if(v)n++;});
 shown.textContent=n;}
eo.addEventListener('change',apply);q.addEventListener('input',apply);
function key(td){var v=td.getAttribute('data-v');return v===null?td.textContent.trim():v;}
function cmp(x,y){if(x===''||y==='')return 0;var a=Number(x),b=Number(y);
 if(!isNaN(a)&&!isNaN(b))return a-b;
 return x.localeCompare(y,undefined,{numeric:true,sensitivity:'base'});}
Array.prototype.forEach.call(ths,function(th,i){th.addEventListener('click',function(){
 var asc=th.getAttribute('aria-sort')!=='ascending';
 Array.prototype.forEach.call(ths,function(h){h.removeAttribute('aria-sort');});
 th.setAttribute('aria-sort',asc?'ascending':'descending');
 rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
  if(x===''||y==='')return (x==='')-(y==='');var c=cmp(x,y);return asc?c:-c;});
 rows.forEach(function(r){tb.appendChild(r);});});});
function ids(){return rows.filter(function(r){return !r.hidden;})
 .map(function(r){return r.getAttribute('data-id');});}
if(location.hash==='#selftest'){var o={total:rows.length};
 eo.click();o.errors=ids();o.shown=shown.textContent;eo.click();
 q.value='chelsea';apply();o.search=ids();q.value='';apply();
 var t=document.querySelector('th[data-col=prompt_tokens]');
 t.click();o.tokens_asc=ids()[0];t.click();o.tokens_desc=ids()[0];o.all=ids();
 var p=document.createElement('pre');p.id='selftest';p.textContent=JSON.stringify(o);
 document.body.appendChild(p);}
})();"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipeline report",
                description="Write a static, self-contained HTML gallery of an output "
                            "dataset (thumbnails, captions, errors, tokens, cost).")
    p.add_argument("out", type=Path, metavar="OUT", help="output dataset directory")
    p.add_argument("--manifest", type=Path,
                   help="the manifest; relative image paths resolve against its folder "
                        "(default: the current directory)")
    p.add_argument("--out", dest="file", type=Path, metavar="FILE",
                   help="where to write the page (default OUT/report.html)")
    p.add_argument("--thumb-size", type=int, default=160, help="thumbnail edge, px (160)")
    p.add_argument("--limit", type=int, default=5000,
                   help="rows written to the page at most (5000); totals cover all rows")
    return p


def _totals(dataset: ds.Dataset) -> dict[str, Any]:
    cols = [c for c in TOTALS if c in dataset.schema.names]
    t: dict[str, Any] = {"rows": 0, "status": Counter(), "classes": Counter(),
                         "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    for b in dataset.to_batches(columns=cols, batch_size=8192):
        t["rows"] += b.num_rows
        d = b.to_pydict()
        t["status"].update(s or "none" for s in d["status"])
        t["classes"].update(c for c in d["error_class"] if c)
        for c in ("prompt_tokens", "completion_tokens", "cost_usd"):
            t[c] += sum(v for v in d.get(c, ()) if v is not None)
    return t


def _newest_run(out: Path) -> dict[str, Any] | None:
    runs = sorted((p.stat().st_mtime, p.name, p) for p in (out / "_runs").glob("*.json"))
    if not runs:
        return None
    try:
        data = json.loads(runs[-1][2].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"run_id": runs[-1][1], "summary": "(unreadable run report)"}
    return data if isinstance(data, dict) else None


def _thumb(image: str | None, base: Path, size: int) -> str:
    """An <img> with a JPEG data URI, a link for URLs, or a placeholder."""
    ph = f'<span class="ph" style="width:{size}px;line-height:{size // 2}px">{{}}</span>'
    if not image:
        return ph.format("no image")
    if image.lower().startswith(("http://", "https://")):
        return f'<a href="{escape(image)}" rel="noreferrer">{escape(image)}</a>'
    path = Path(image) if os.path.isabs(image) else base / image
    if not path.is_file():
        return ph.format("missing")
    return _jpeg(str(path), image, size) or ph.format("unreadable")


@functools.lru_cache(maxsize=256)  # repeated images (duplicates) are decoded once
def _jpeg(path: str, image: str, size: int) -> str | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, "white")
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=70)
    except Exception:  # noqa: BLE001 - any unreadable image becomes a placeholder
        return None
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img src="{uri}" width="{im.width}" height="{im.height}" '
            f'alt="{escape(image)}" loading="lazy">')


def _num(v: Any, fmt: str = "{}") -> str:
    if v is None:
        return '<td class="n" data-v=""></td>'
    return f'<td class="n" data-v="{escape(str(v))}">{escape(fmt.format(v))}</td>'


def _row(r: dict[str, Any], base: Path, size: int, cost: bool) -> str:
    status = r.get("status") or ""
    cap = r.get("caption") or ""
    caps = [c for c in (r.get("captions") or []) if c is not None]
    if len(caps) > 1:
        cap = "\n\u2014\n".join(caps)
    text = lambda k: escape(str(r.get(k) or ""))  # noqa: E731
    dup = f'<div class="dup">dup of {text("dedup_of")}</div>' if r.get("dedup_of") else ""
    err = (f'<td data-v="{text("error_class")}"><span class="ec">{text("error_class")}</span>'
           f'<div class="err">{text("error")}</div></td>')
    cells = [f'<td data-v="{text("image")}">{_thumb(r.get("image"), base, size)}</td>',
             f"<td>{text('id')}</td>", f"<td>{text('prompt_name')}</td>",
             f"<td>{escape(status)}</td>", f'<td class="cap">{escape(cap)}{dup}</td>', err,
             _num(r.get("prompt_tokens")), _num(r.get("completion_tokens"))]
    if cost:
        cells.append(_num(r.get("cost_usd"), "${:.6f}"))
    cells += [_num(r.get("latency_s"), "{:.2f}s"), _num(r.get("attempts"))]
    return (f'<tr data-id="{text("id")}" data-status="{escape(status)}"'
            f'{" class=error" if status == "error" else ""}>{"".join(cells)}</tr>\n')


def _head(out: Path, t: dict[str, Any], run: dict[str, Any] | None, cost: bool,
          written: int) -> Iterator[str]:
    title = escape(f"Caption report: {out.resolve().name}")
    yield (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
           f"<title>{title}</title>\n<style>{CSS}</style></head><body>\n<h1>{title}</h1>\n")
    st = t["status"]
    other = t["rows"] - st["ok"] - st["error"]
    parts = [f"rows <b>{t['rows']}</b>", f"ok <b>{st['ok']}</b>",
             f"error <b>{st['error']}</b>"] + ([f"other <b>{other}</b>"] if other else [])
    parts.append(f"tokens in/out <b>{t['prompt_tokens']}</b> / "
                 f"<b>{t['completion_tokens']}</b>")
    if cost:
        parts.append(f"cost <b>${t['cost_usd']:.4f}</b>")
    yield f'<div class="totals">{"".join(f"<span>{p}</span>" for p in parts)}</div>\n'
    if t["classes"]:
        cls = ", ".join(f"{escape(k)}: {v}" for k, v in t["classes"].most_common())
        yield f'<div class="totals">error classes: {cls}</div>\n'
    if run:
        bits = [f"newest run <b>{escape(str(run.get('run_id', '?')))}</b>",
                escape(str(run.get("summary") or ""))]
        for k in ("fatal", "interrupted"):
            if run.get(k):
                bits.append(f"{k}: {escape(str(run[k]))}")
        if run.get("error_classes"):
            bits.append("errors: " + escape(json.dumps(run["error_classes"], sort_keys=True)))
        yield f'<div class="run">{" &middot; ".join(bits)}</div>\n'
    if written < t["rows"]:
        yield (f'<div class="warn">Truncated: showing the first {written} of {t["rows"]} '
               f"rows (--limit); the totals above cover all rows.</div>\n")
    yield ('<div class="controls"><label><input type="checkbox" id="erronly"> show only '
           'errors</label><input type="search" id="q" placeholder="search id, caption, '
           f'error\u2026"> <span id="shown">{written}</span> shown</div>\n')
    heads = [("image", "image"), ("id", "id"), ("prompt_name", "prompt"),
             ("status", "status"), ("caption", "caption"), ("error", "error"),
             ("prompt_tokens", "tokens in"), ("completion_tokens", "tokens out")]
    heads += [("cost_usd", "cost")] if cost else []
    heads += [("latency_s", "latency"), ("attempts", "attempts")]
    ths = "".join(f'<th data-col="{c}">{escape(n)}</th>' for c, n in heads)
    yield f'<table id="rows"><thead><tr>{ths}</tr></thead><tbody>\n'


def main(argv: Sequence[str]) -> int:
    ns = _parser().parse_args(list(argv))
    if ns.thumb_size < 8 or ns.limit < 0:
        print("report: error: --thumb-size must be >= 8 and --limit >= 0", file=sys.stderr)
        return 2
    parts = sorted(ns.out.glob("part-*.parquet")) if ns.out.is_dir() else []
    if not parts:
        print(f"report: error: no part-*.parquet files in {ns.out}", file=sys.stderr)
        return 2
    try:
        schema = pa.unify_schemas([pq.read_schema(p) for p in parts])
    except (OSError, pa.ArrowException) as e:
        print(f"report: error: cannot read {ns.out}: {e}".splitlines()[0], file=sys.stderr)
        return 2
    for name, typ in (("status", pa.string()), ("error_class", pa.string())):
        if name not in schema.names:
            schema = schema.append(pa.field(name, typ))
    dataset = ds.dataset([str(p) for p in parts], schema=schema, format="parquet")
    cost = "cost_usd" in schema.names
    base = ns.manifest.resolve().parent if ns.manifest else Path.cwd()
    dest = ns.file or ns.out / "report.html"
    totals = _totals(dataset)
    _jpeg.cache_clear()
    written = min(totals["rows"], ns.limit)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_head(ns.out, totals, _newest_run(ns.out), cost, written))
        left = written
        cols = [c for c in WANTED if c in schema.names]
        for batch in dataset.to_batches(columns=cols, batch_size=256):
            if left <= 0:
                break
            for r in batch.slice(0, left).to_pylist():
                f.write(_row(r, base, ns.thumb_size, cost))
            left -= min(left, batch.num_rows)
        f.write(f"</tbody></table>\n<script>{JS}</script>\n</body></html>\n")
    os.replace(tmp, dest)
    print(f"report: {written} of {totals['rows']} rows -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
