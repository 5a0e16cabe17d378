"""``python -m pipeline export``: hand the captions of OUT to trainers and tools.

One module per format behind one writer interface (``base.Writer``), fed by one
reader of the committed dataset:

    reader.py       OUT's parts -> the newest ok row per key, in batches, flat memory
    images.py       an ``image`` value -> local path / URL, its place under DEST, copies
    base.py         options (Spec), the Writer interface, counters, DEST rules, text rules
    sidecar.py      NAME.txt per image (kohya, OneTrainer, diffusers), policies, trigger
    imagefolder.py  images + metadata.jsonl (datasets "imagefolder")
    hfparquet.py    Parquet shards with the image embedded and datasets feature metadata
    tabular.py      JSONL and CSV, one line per key
    command.py      argparse, the run, exit codes
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    from .command import main as run_main  # imported late: `python -m pipeline` stays fast

    return run_main(argv)
