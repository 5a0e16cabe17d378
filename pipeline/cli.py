"""Command line: ``python -m pipeline COMMAND ...`` → the command → its exit code.

The only place that reads ``sys.argv``; each command lives in ``commands/`` (``caption``
builds a run session), imported when it is used so ``--help`` stays fast. Every line
any command prints passes the redactor.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .commands.caption import caption, did_you_mean
from .errors import PipelineError
from .logs import Say, wants_json
from .redact import add_secret, redacted_std_streams
from .wire.adapters import key_variables

COMMANDS = ("caption", "run", "status", "report", "export", "cancel", "simulate", "demo")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline {caption,simulate,demo} ...``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"caption": caption, "run": _run_job, "status": _status, "report": _report,
                "simulate": _simulate, "demo": _demo}
    commands["export"] = _export
    commands["cancel"] = _cancel
    if args and args[0] not in commands and args[0] not in ("-h", "--help"):
        Say(wants_json(args))("error", _unknown_command(args[0]), exit_code=2)
        return 2
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m pipeline "
              "{caption,run,status,report,export,cancel,simulate,demo} ...\n"
              "  caption INPUT [options]      caption a manifest, folder or shards "
              "(caption --help)\n"
              "  run JOB.toml [options]       run a job file; options override it\n"
              "  status OUT [--manifest M]    done / failed / pending and the last runs\n"
              "  report OUT [--html PAGE]     write OUT/_report.html, a review gallery\n"
              "  export OUT --to D --format F  captions for trainers (sidecar, hf-*,\n"
              "                               webdataset, jsonl, csv)\n"
              "  cancel OUT                   cancel the batch lane's batches in flight\n"
              "  simulate [--port P]          serve the local gateway simulator\n"
              "  demo                         caption data/sample with the simulator",
              file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    for name in key_variables():
        add_secret(os.environ.get(name))  # also for status/report over older output
    try:
        with redacted_std_streams():  # nothing printed by any command carries a secret
            return commands[args[0]](args[1:])
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _unknown_command(word: str) -> str:
    if word.startswith("-"):
        return (f"{word} is an option, not a command: options follow the command, e.g. "
                f"`python -m pipeline caption MANIFEST {word} ...`")
    hint = did_you_mean(word, COMMANDS, quote=True)
    return (f"unknown command {word!r}{hint}" if hint else
            f"unknown command {word!r} (commands: {', '.join(COMMANDS)})")


def _run_job(argv: Sequence[str]) -> int:
    say = Say(wants_json(argv))
    if not argv or argv[0].startswith("-"):
        say("error", "usage: python -m pipeline run JOB.toml [caption options]")
        return 2
    from .commands.jobfile import job_argv

    try:
        job = job_argv(Path(argv[0]))
    except PipelineError as e:
        say("error", e.message, exit_code=2)
        return 2
    return caption([*job, *argv[1:]])


def _status(argv: Sequence[str]) -> int:
    from .commands import status

    return status.main(list(argv))


def _report(argv: Sequence[str]) -> int:
    from .commands import report

    return report.main(list(argv))


def _export(argv: Sequence[str]) -> int:
    from . import export

    return export.main(list(argv))


def _cancel(argv: Sequence[str]) -> int:
    from .commands import cancel

    return cancel.main(list(argv))


def _simulate(argv: Sequence[str]) -> int:
    from .simulator import cli as simulator

    return simulator.main(list(argv))


def _demo(argv: Sequence[str]) -> int:
    from .commands import demo

    return demo.main(list(argv))
