"""The ``pipeline`` command: a thin dispatcher to the library's entry functions.

Each subcommand lives in the module that owns it and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them,
importing a module when its subcommand is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from pipeline.config.load import LEGACY_WEIGHTS
from pipeline.config.rules import load_checked
from pipeline.errors import UserError
from pipeline.secrets import redact

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-shards": ("pipeline.data.make_shards", "convert a dataset into WebDataset shards"),
    "validate-shards": ("pipeline.data.validate", "read every shard and report problems"),
    "train": (
        "pipeline.train.entry",
        "train with Smooth-AP (DeepSpeed; 1 process, torchrun or srun)",
    ),
    "evaluate": ("pipeline.eval.evaluator", "extract embeddings and compute retrieval metrics"),
    "demo": ("pipeline.demo", "synthetic shards, 2-process CPU training, before/after table"),
    "export": (
        "pipeline.serve.export",
        "a trained model as ONNX / TorchScript (+ preprocessing JSON) or an MLflow model",
    ),
    "build-gallery": (
        "pipeline.serve.gallery",
        "embed a gallery (shards or image folder) into a searchable FAISS index",
    ),
    "search": ("pipeline.serve.search", "the nearest gallery items of query images"),
    "provenance": (
        "pipeline.serve.show_provenance",
        "where weights, a checkpoint, an export or a gallery come from (identity, run, step)",
    ),
}


# Old command names users may have in scripts -> the name now; they still run, with a message.
RENAMED: dict[str, str] = {"index": "build-gallery"}


def _renamed(argv: list[str]) -> list[str]:
    """``argv`` with an old command name replaced by its new one (a message on stderr)."""
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None or argv[at] not in RENAMED:
        return argv
    new = RENAMED[argv[at]]
    print(
        f"deprecated: `pipeline {argv[at]}` is now `pipeline {new}`; the old name will stop working",
        file=sys.stderr,
    )
    return [*argv[:at], new, *argv[at + 1 :]]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Smooth-AP training pipeline for large-scale image retrieval.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen subcommand imports its module
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def check_config(args: argparse.Namespace) -> None:
    """Apply the cross-section config rules to the config a command names (its ``--config``
    and ``KEY=VALUE`` overrides), before the command runs: the commands below the rules load
    and type-check their config themselves."""
    if not (hasattr(args, "config") and hasattr(args, "overrides")):
        return
    load_checked(args.config, [o for o in args.overrides if not o.startswith(LEGACY_WEIGHTS)])


def main(argv: list[str] | None = None) -> int:
    argv = _renamed(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        check_config(args)
        return int(args._run(args) or 0)
    except UserError as e:  # bad input, explained in one line; anything else keeps its traceback
        print(f"pipeline {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return 2


def exit_code(run: Callable[[], int | None]) -> int:
    """``run()``'s exit code as Python's own exit computes it, from its return value or the
    exception it ended with (printed, as Python prints it): SystemExit's code, 130 for
    KeyboardInterrupt, 1 for any other exception."""
    try:
        return int(run() or 0)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:
        traceback.print_exc()
        return 1


def end(code: int) -> NoReturn:
    """End the process with ``code``: through ``pipeline.distributed.group.exit_process`` when this
    process has loaded the process group's module (so a rank's gloo threads cannot abort it in the
    interpreter's teardown, see there), else a plain exit."""
    group = sys.modules.get("pipeline.distributed.group")
    if group is None:
        sys.exit(code)
    group.exit_process(code)


def console(argv: list[str] | None = None) -> NoReturn:
    """The ``pipeline`` command (and ``python -m pipeline.cli``): :func:`main`, then :func:`end`."""
    end(exit_code(lambda: main(argv)))


if __name__ == "__main__":
    console()
