"""`make demo`: caption the bundled sample photos against the local simulator.

Starts the simulator as a separate process on a free port (it is a simulator: no
model runs, captions are built from each image's real size and colours), runs the
normal `caption` command against it, shows a few rows of the Parquet output, and
stops the simulator. Needs no API key and no network.
"""

from __future__ import annotations

import shutil

from .sample import MANIFEST, ROOT, demo_out, start_simulator

OUT = ROOT / "out" / "demo"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--batch"]:  # `make demo-batch`: the batch lane and what it saves
        from .demo_batch import main as batch_demo

        return batch_demo(argv[1:])
    if argv[:1] == ["--quality"]:  # `make demo-quality`: the quality gate, chained prompts
        from .demo_quality import main as quality_demo

        return quality_demo(argv[1:])
    from .caption import caption

    proc, base_url = start_simulator("--latency", "0.2", "--tokens-per-second", "80")
    print(f"demo: local gateway simulator at {base_url} (a simulator, not a model)")
    try:
        out, own = demo_out(argv, OUT)
        if own:  # the demo's own folder starts empty; a folder the user names is kept
            shutil.rmtree(out, ignore_errors=True)
        code = caption([str(MANIFEST), "--out", str(out), "--base-url", base_url, *argv])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if code in (0, 1):
        import pandas as pd

        df = pd.read_parquet(out)
        cols = ["id", "status", "prompt_tokens", "completion_tokens", "caption"]
        with pd.option_context("display.max_colwidth", 70, "display.width", 160):
            print(df[cols].sort_values("id").to_string(index=False))
        print(f"demo: {len(df)} rows written to {out} (read with pandas.read_parquet)")
    return code
