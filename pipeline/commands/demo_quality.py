"""`make demo-quality`: the quality gate and chained prompts on the sample photos.

The simulator answers scripted bad captions on the triggers of data/sample/quality.csv
(a refusal written as the caption, one too long, one in French, one repeated, one
wrapped in chat, and a near miss the gate must let through). Three chained prompts
run per image: ``tags``, a ``long`` caption that uses them (the trigger is here), and
a ``short`` one derived from the long one. Each failed caption is re-asked once; the
table shows what was caught, what the re-ask fixed, and what it cost.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .sample import ROOT, demo_out, start_simulator

MANIFEST = ROOT / "data" / "sample" / "quality.csv"
OUT = ROOT / "out" / "demo-quality"
PROMPTS = [
    "tags=List five tags for this image, comma separated.",
    "long=Write a detailed caption of the image that uses these tags: {caption.tags}. "
    "{trigger}",
    "short=Shorten this caption to one line: {caption.long}",
]
GATE = ["--quality-max-words", "60", "--quality-language", "en",
        "--quality-max-repeats", "1"]


def main(argv: list[str]) -> int:
    from .caption import caption

    proc, base_url = start_simulator("--latency", "0.1", "--tokens-per-second", "200")
    print(f"demo: local gateway simulator at {base_url} (a simulator, not a model)")
    args = [a for p in PROMPTS for a in ("--named-prompt", p)] + GATE
    try:
        out, own = demo_out(argv, OUT)
        if own:  # the demo's own folder starts empty; a folder the user names is kept
            shutil.rmtree(out, ignore_errors=True)
        code = caption([str(MANIFEST), "--out", str(out), "--base-url", base_url, *args,
                        *argv])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if code in (0, 1):
        _show(out)
    return code


def _show(out: Path) -> None:
    import pandas as pd

    df = pd.read_parquet(out)
    df["flags"] = df["quality_flags"].map(lambda f: ",".join(f) if f is not None else "")
    df["re-asked for"] = df["reask_flags"].map(lambda f: ",".join(f) if f is not None else "")
    long = df[df["prompt_name"] == "long"].sort_values("id")
    long["caption"] = long["caption"].str.slice(0, 64)
    print(long[["id", "re-asked for", "flags", "caption"]].to_string(index=False))
    total, extra = df["cost_usd"].sum(), df["reask_cost_usd"].fillna(0).sum()
    asked = df[df["reasks"] > 0]
    first = (asked["cost_usd"] - asked["reask_cost_usd"]).sum()
    print(f"demo: {len(df)} rows ({df['prompt_name'].nunique()} chained prompts); "
          f"{len(asked)} re-asked, {int((df['flags'] != '').sum())} still flagged; re-asks "
          f"cost ${extra:.4f} of ${total:.4f} ({100 * extra / total:.0f} %), "
          f"${extra / max(1, len(asked)):.4f} each, {100 * extra / first:.0f} % of those "
          f"rows' first requests; out={out}")
