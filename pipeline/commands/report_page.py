"""The review gallery's page: one card per image, its pictures, and the page's CSS and JS.

A card shows the image once (a ``data:`` URI: the page works offline and fetches
nothing) and beside it each prompt's caption, or its error where there is one; the
manifest's own columns sit under the id and can be filtered. Clicking a picture opens
it larger: photos from a second, larger JPEG, and images smaller than the thumbnail
box (a 16 x 12 icon) scaled up by a whole factor with ``image-rendering: pixelated``,
so their pixels stay crisp instead of a blur.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

_LOSSLESS_MAX_PIXELS = 256 * 256  # a small image is sent as PNG: JPEG would smear its pixels

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px}.totals span{margin-right:16px}
.run,.base{background:#eef0f6;padding:6px 10px;margin:8px 0;border-radius:4px}
.base{background:#f4f4f4;color:#555;font-size:12px}
.warn{background:#fff3cd;padding:6px 10px;margin:8px 0;border-radius:4px}
.controls{margin:10px 0;display:flex;flex-wrap:wrap;gap:8px 16px;align-items:center}
.controls input[type=search]{width:280px}.controls label{white-space:nowrap}
select.col{max-width:240px}
#cards{display:flex;flex-direction:column;gap:10px}
.card{display:flex;gap:14px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
.card[data-status=error]{border-color:#e6a3a3}.card[hidden]{display:none}
figure{margin:0;flex:0 0 auto;display:flex;align-items:flex-start;justify-content:center}
img.thumb{display:block;cursor:zoom-in;background:#eee}img.px,#big.px{image-rendering:pixelated}
.ph{display:inline-block;background:#ddd;color:#666;font-size:11px;text-align:center}
.body{flex:1;min-width:0}.head{margin-bottom:4px}.id{font-weight:600;margin-right:8px}
.file{color:#666;font-size:12px;word-break:break-all}.meta{margin:2px 0 6px}
.meta span{display:inline-block;background:#eef3ee;border-radius:3px;padding:0 6px;
margin:0 6px 3px 0;font-size:12px}.meta b{font-weight:600;color:#355}
.prompt{display:grid;grid-template-columns:110px 1fr auto;gap:8px;padding:4px 0;
border-top:1px solid #f0f0f0}.pn{color:#555;font-size:12px;word-break:break-all}
.cap{white-space:pre-wrap;margin:0}.n{color:#777;font-size:12px;white-space:nowrap}
.prompt.error .cap{color:#900}.ec{font-weight:600;margin-right:6px}
.dup{color:#777;font-size:12px}.qf span{display:inline-block;border-radius:3px;padding:0 6px;
margin:2px 6px 0 0;font-size:12px;background:#fde8c8;color:#7a4a00}.qf span.ra{background:#e4ecfa;
color:#234}a.url{word-break:break-all;font-size:12px;max-width:160px}
#lightbox{position:fixed;inset:0;background:rgba(0,0,0,.85);display:flex;flex-direction:column;
align-items:center;justify-content:center;cursor:zoom-out;z-index:10}#lightbox[hidden]{display:none}
#lbcap{color:#eee;margin-top:8px;font-size:13px}"""

JS = r"""(function(){
var box=document.getElementById('cards'),cards=[].slice.call(box.querySelectorAll('.card'));
var eo=document.getElementById('erronly'),q=document.getElementById('q'),
    shown=document.getElementById('shown'),sortby=document.getElementById('sortby'),
    sels=[].slice.call(document.querySelectorAll('select.col')),qf=document.getElementById('qf');
var lb=document.getElementById('lightbox'),big=document.getElementById('big'),
    lbcap=document.getElementById('lbcap');
function meta(c){if(!c._m){try{c._m=JSON.parse(c.getAttribute('data-m')||'{}');}
 catch(e){c._m={};}}return c._m;}
function num(c,k){return Number(c.getAttribute(k))||0;}
function apply(){var s=q.value.toLowerCase(),e=eo.checked,n=0;
 cards.forEach(function(c){var v=(!e||c.getAttribute('data-status')==='error')&&
  (!s||c.textContent.toLowerCase().indexOf(s)>=0);
  sels.forEach(function(sel){if(v&&sel.selectedIndex>0){var x=meta(c)[sel.getAttribute('data-col')];
   v=(x===null||x===undefined?'':String(x))===sel.value;}});
  if(v&&qf&&qf.value){var fl=(c.getAttribute('data-flags')||'').split(' ').filter(Boolean);
   v=qf.value==='*'?fl.length>0:qf.value==='+reask'?c.getAttribute('data-reasked')==='1':
    fl.indexOf(qf.value)>=0;}
  c.hidden=!v;if(v)n++;});
 shown.textContent=n;}
var order={line:function(a,b){return num(a,'data-line')-num(b,'data-line');},
 id:function(a,b){return a.getAttribute('data-id').localeCompare(b.getAttribute('data-id'),
  undefined,{numeric:true});},
 tokens:function(a,b){return num(b,'data-tokens')-num(a,'data-tokens');},
 cost:function(a,b){return num(b,'data-cost')-num(a,'data-cost');},
 errors:function(a,b){return (a.getAttribute('data-status')!=='error')-
  (b.getAttribute('data-status')!=='error');}};
function sort(){var f=order[sortby.value]||order.line;
 cards.sort(function(a,b){return f(a,b)||order.line(a,b);});
 cards.forEach(function(c){box.appendChild(c);});}
function fit(){var w=big.naturalWidth,h=big.naturalHeight;if(!w||!h)return;
 var s=Math.min(innerWidth*0.92/w,innerHeight*0.85/h);
 if(big.className==='px')s=Math.max(1,Math.floor(s));else s=Math.min(1,s);
 big.width=Math.round(w*s);big.height=Math.round(h*s);}
function open(img){big.onload=fit;big.className=img.classList.contains('px')?'px':'';
 big.removeAttribute('width');big.removeAttribute('height');
 big.src=img.getAttribute('data-full')||img.src;lbcap.textContent=img.alt;lb.hidden=false;}
function close(){lb.hidden=true;big.removeAttribute('src');}
box.addEventListener('click',function(ev){var t=ev.target;
 if(t.tagName==='IMG'&&t.classList.contains('thumb'))open(t);});
lb.addEventListener('click',close);
document.addEventListener('keydown',function(ev){if(ev.key==='Escape')close();});
eo.addEventListener('change',apply);q.addEventListener('input',apply);
sels.forEach(function(s){s.addEventListener('change',apply);});
if(qf)qf.addEventListener('change',apply);
sortby.addEventListener('change',sort);
function ids(){return cards.filter(function(c){return !c.hidden;})
 .map(function(c){return c.getAttribute('data-id');});}
if(location.hash.indexOf('#selftest')===0){
 var p={};location.hash.slice(10).split('&').forEach(function(kv){var i=kv.indexOf('=');
  if(i>0)p[kv.slice(0,i)]=decodeURIComponent(kv.slice(i+1));});
 var o={cards:cards.length,order:ids(),pictures:{},prompts:{}};
 cards.forEach(function(c){var id=c.getAttribute('data-id');
  o.pictures[id]=c.querySelectorAll('figure img,figure a,figure .ph').length;
  o.prompts[id]=[].map.call(c.querySelectorAll('.prompt'),function(x){
   return x.getAttribute('data-prompt');});});
 eo.click();o.errors=ids();o.shown=shown.textContent;eo.click();
 if(p.search){q.value=p.search;apply();o.search=ids();q.value='';apply();}
 var sel=p.col&&document.querySelector('select.col[data-col="'+p.col+'"]');
 if(sel){o.choices=[].map.call(sel.options,function(x){return x.value;}).slice(1);
  sel.value=p.val;sel.dispatchEvent(new Event('change'));o.filtered=ids();
  sel.selectedIndex=0;apply();}
 if(p.qual&&qf){o.qualities=[].map.call(qf.options,function(x){return x.value;}).slice(1);
  qf.value=p.qual;apply();o.quality=ids();qf.value='';apply();}
 sortby.value='tokens';sort();o.by_tokens=ids();sortby.value='line';sort();
 function enlarge(sel2){var t=document.querySelector(sel2);if(!t)return Promise.resolve(null);
  open(t);return new Promise(function(ok){var done=function(){fit();var r={open:!lb.hidden,
   src_is_full:big.src===(t.getAttribute('data-full')||t.src),px:big.className==='px',
   natural:[big.naturalWidth,big.naturalHeight],shown:[big.width,big.height],
   thumb:[t.width,t.height]};big.click();r.closed=lb.hidden;ok(r);};
   if(big.complete&&big.naturalWidth)done();else big.onload=done;});}
 enlarge('img.thumb[data-full]').then(function(r){o.photo=r;return enlarge('img.thumb.px');})
 .then(function(r){o.tiny=r;var pre=document.createElement('pre');pre.id='selftest';
  pre.textContent=JSON.stringify(o);document.body.appendChild(pre);});}
})();"""


def _uri(im: Any, fmt: str, quality: int = 80) -> str:
    buf = io.BytesIO()
    if fmt == "PNG":
        im.save(buf, "PNG", optimize=True)
    else:
        im.save(buf, "JPEG", quality=quality)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def placeholder(size: int, text: str, title: str = "") -> str:
    tip = f' title="{escape(title)}"' if title else ""
    return (f'<span class="ph" style="width:{size}px;line-height:{size // 2}px"{tip}>'
            f"{escape(text)}</span>")


def picture(image: str | None, base: Path, size: int, large: int) -> str:
    """The figure of a card: an <img> (click to enlarge), a link for URLs, or a
    placeholder that says why there is no picture."""
    if not image:
        return placeholder(size, "no image")
    if image.lower().startswith(("http://", "https://")):
        return f'<a class="url" href="{escape(image)}" rel="noreferrer">{escape(image)}</a>'
    path = Path(image) if os.path.isabs(image) else base / image
    if not path.is_file():
        return placeholder(size, "missing", str(path))
    return _encoded(str(path), image, size, large) or placeholder(size, "unreadable", str(path))


@functools.lru_cache(maxsize=64)  # one image in several cards is decoded once
def _encoded(path: str, image: str, size: int, large: int) -> str | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (max(size, large), max(size, large)))
            im: Image.Image = ImageOps.exif_transpose(opened)
            if im.mode in ("RGBA", "LA", "P", "PA"):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, "white")
                im.paste(rgba, mask=rgba.getchannel("A"))
            im = im.convert("RGB")
            w, h = im.size
            alt = escape(image)
            if max(w, h) < size:  # smaller than the box: whole-factor scale, crisp pixels
                k = max(1, size // max(w, h))
                fmt = "PNG" if w * h <= _LOSSLESS_MAX_PIXELS else "JPEG"
                cls = "thumb px" if k > 1 else "thumb"
                return (f'<img class="{cls}" src="{_uri(im, fmt)}" width="{w * k}" '
                        f'height="{h * k}" alt="{alt}">')
            thumb = im.copy()
            thumb.thumbnail((size, size))
            full = ""
            if large > size:
                im.thumbnail((large, large))
                full = f' data-full="{_uri(im, "JPEG", 82)}"'
            return (f'<img class="thumb" src="{_uri(thumb, "JPEG", 72)}" width="{thumb.width}"'
                    f' height="{thumb.height}" alt="{alt}"{full} loading="lazy">')
    except Exception:  # noqa: BLE001 - any unreadable image becomes a placeholder
        return None


def _money(v: Any) -> str:
    return f"${v:.6f}" if isinstance(v, int | float) and not isinstance(v, bool) else ""


def _prompt(r: dict[str, Any]) -> str:
    name = escape(str(r.get("prompt_name") or ""))
    if r.get("status") == "ok":
        caps = [c for c in (r.get("captions") or []) if c is not None]
        text = "\n\u2014\n".join(caps) if len(caps) > 1 else (r.get("caption") or "")
        dup = (f'<div class="dup">copied from {escape(str(r["dedup_of"]))} (identical '
               "image)</div>") if r.get("dedup_of") else ""
        body = f'<p class="cap">{escape(text)}</p>{dup}{_quality(r)}'
    else:
        body = (f'<p class="cap"><span class="ec">{escape(str(r.get("error_class") or "error"))}'
                f'</span>{escape(str(r.get("error") or ""))}</p>')
        if r.get("error_class") == "quality" and r.get("caption"):  # kept to inspect
            body += f'<p class="cap">{escape(str(r["caption"]))}</p>{_quality(r)}'

    tokens = (r.get("prompt_tokens") or 0) + (r.get("completion_tokens") or 0)
    bits = [f"{tokens} tok" if tokens else "", _money(r.get("cost_usd")),
            f"{r['latency_s']:.2f}s" if isinstance(r.get("latency_s"), float) else ""]
    status = "ok" if r.get("status") == "ok" else "error"
    return (f'<div class="prompt {status}" data-prompt="{name}"><span class="pn">{name}</span>'
            f'{body}<span class="n">{escape(" · ".join(b for b in bits if b))}</span></div>')


def _quality(r: dict[str, Any]) -> str:
    """The quality gate's marks: each flag of the kept caption, and the re-ask."""
    note = escape(str(r.get("quality_notes") or ""))
    chips = [f'<span title="{note}">{escape(str(f))}</span>'
             for f in r.get("quality_flags") or []]
    if r.get("reasks"):
        why = ", ".join(str(f) for f in r.get("reask_flags") or [])
        chips.append(f'<span class="ra">re-asked ({escape(why)})</span>')
    return f'<div class="qf">{"".join(chips)}</div>' if chips else ""


def flags_of(rows: Sequence[dict[str, Any]]) -> tuple[list[str], bool]:
    """The flags on a card's rows (sorted, once each), and whether any was re-asked."""
    flags = sorted({str(f) for r in rows for f in r.get("quality_flags") or []})
    return flags, any(r.get("reasks") for r in rows)


def card(rows: Sequence[dict[str, Any]], extras: Sequence[str], base: Path, size: int,
         large: int, more: int = 0) -> str:
    """One image's card: the picture once, each prompt's caption or error beside it."""
    first = rows[0]
    meta = {c: first.get(c) for c in extras}
    chips = "".join(f"<span><b>{escape(c)}</b> {escape(str(v))}</span>"
                    for c, v in meta.items() if v not in (None, ""))
    error = any(r.get("status") != "ok" for r in rows)
    tokens = sum((r.get("prompt_tokens") or 0) + (r.get("completion_tokens") or 0) for r in rows)
    cost = sum(r.get("cost_usd") or 0.0 for r in rows)
    line = first.get("line") if isinstance(first.get("line"), int) else 0
    extra = f'<div class="n">{more} more prompt rows not shown</div>' if more else ""
    flags, reasked = flags_of(rows)
    return (f'<article class="card" data-id="{escape(str(first.get("id")))}" data-line="{line}"'
            f' data-status="{"error" if error else "ok"}" data-tokens="{tokens}" '
            f'data-flags="{escape(" ".join(flags))}" data-reasked="{int(reasked)}" '
            f'data-cost="{cost:.6f}" data-m="{escape(json.dumps(meta, default=str))}">'
            f'<figure>{picture(first.get("image"), base, size, large)}</figure>'
            f'<div class="body"><div class="head"><span class="id">'
            f'{escape(str(first.get("id")))}</span><span class="file">'
            f'{escape(str(first.get("image") or ""))}</span></div>'
            f'<div class="meta">{chips}</div>{"".join(_prompt(r) for r in rows)}{extra}'
            "</div></article>\n")


def controls(choices: dict[str, list[tuple[str, int]]], shown: int,
             quality: tuple[list[tuple[str, int]], int, int] = ([], 0, 0)) -> str:
    """Error filter, search, a filter per manifest column with few values, the quality
    gate's flags (``quality``: cards per flag, cards flagged, cards re-asked), sorting."""
    flags, flagged, reasked = quality
    qsel = ""
    if flagged or reasked:
        qsel = ('<label>quality <select id="qf"><option value="">all</option>'
                f'<option value="*">any flag ({flagged})</option>'
                + "".join(f'<option value="{escape(f)}">{escape(f)} ({n})</option>'
                          for f, n in flags)
                + f'<option value="+reask">re-asked ({reasked})</option></select></label>')
    sels = "".join(
        f'<label>{escape(col)} <select class="col" data-col="{escape(col)}"><option>all'
        "</option>" + "".join(f'<option value="{escape(v)}">{escape(v or "(empty)")} ({n})'
                              "</option>" for v, n in values) + "</select></label>"
        for col, values in choices.items())
    return ('<div class="controls"><label><input type="checkbox" id="erronly"> show only '
            'errors</label><input type="search" id="q" placeholder="search id, caption, '
            f'error, column\u2026">{sels}{qsel}<label>sort <select id="sortby">'
            '<option value="line">manifest order</option><option value="id">id</option>'
            '<option value="tokens">most tokens</option><option value="cost">most cost'
            '</option><option value="errors">errors first</option></select></label>'
            f'<span><span id="shown">{shown}</span> shown</span></div>\n<div id="cards">\n')


FOOT = ('</div>\n<div id="lightbox" hidden><img id="big" alt=""><div id="lbcap"></div></div>'
        f"\n<script>{JS}</script>\n</body></html>\n")
