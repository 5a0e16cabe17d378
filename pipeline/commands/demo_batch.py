"""`make demo-batch`: the batch lane end to end against the local simulator, and what
it saves: the sample photos captioned online and through the batch lane (the simulator
expires and fails a share of the batch requests, which are resubmitted), then the two
datasets compared key by key: same captions and token counts, the cost of each lane.
"""

from __future__ import annotations

import shutil

from .sample import MANIFEST, ROOT, start_simulator

ONLINE, BATCH = ROOT / "out" / "demo-online", ROOT / "out" / "demo-batch"
MODEL = "claude-3-5-sonnet-20240620"  # priced in the built-in table ($3 / $15 online)


def main(argv: list[str]) -> int:
    from .caption import caption

    proc, base_url = start_simulator("--latency", "0.05", "--tokens-per-second", "0",
                                 "--batch-delay", "1", "--batch-fail-rate", "0.15",
                                 "--batch-expire-rate", "0.15", "--seed", "3")
    print(f"demo: local simulator at {base_url} (its batch APIs expire and fail 15 % each)")
    common = [str(MANIFEST), "--base-url", base_url, "--model", MODEL, "--no-progress",
              *argv]
    try:
        for out in (ONLINE, BATCH):
            shutil.rmtree(out, ignore_errors=True)
        code = caption([*common, "--out", str(ONLINE)])
        if code == 0:
            code = caption([*common, "--out", str(BATCH), "--lane", "batch", "--wait",
                            "--poll-interval", "0.5"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if code != 0:
        return code
    return _compare()


def _compare() -> int:
    import pandas as pd

    a = pd.read_parquet(ONLINE).set_index(["id", "prompt_name"]).sort_index()
    b = pd.read_parquet(BATCH).set_index(["id", "prompt_name"]).sort_index()
    same = list(a.index) == list(b.index) and (a["caption"] == b["caption"]).all() \
        and (a["prompt_tokens"] == b["prompt_tokens"]).all()
    print(f"\n{'lane':<8}{'rows':>6}{'tokens in':>11}{'tokens out':>12}{'cost USD':>12}"
          f"{'batches':>9}")
    for name, df in (("online", a), ("batch", b)):
        batches = df["batch_id"].nunique() if name == "batch" else "-"
        print(f"{name:<8}{len(df):>6}{int(df['prompt_tokens'].sum()):>11}"
              f"{int(df['completion_tokens'].sum()):>12}{df['cost_usd'].sum():>12.6f}"
              f"{batches:>9}")
    saving = 1 - b["cost_usd"].sum() / a["cost_usd"].sum()
    print(f"demo: same keys, captions and token counts: {'yes' if same else 'NO'}; "
          f"the batch lane cost {saving:.0%} less ({BATCH})")
    return 0 if same else 1
