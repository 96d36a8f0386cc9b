"""Every one-line error is a ``UserError``, found by class, not registered by name.

The CLI prints a ``UserError`` in one line and keeps the traceback of anything else; this test
walks the whole package, so an error class that is moved or added without the base is caught
here instead of turning into a traceback for a user.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil

import pytest

import pipeline
from pipeline import cli
from pipeline.errors import UserError

# Exceptions of the package that are not bad input: internal signals between its own parts.
INTERNAL = {
    "pipeline.demo._TrainingFailed",  # caught inside the demo, which prints its own message
    "pipeline.data.image.UnsupportedImage",  # caught by the writer, counted as a skipped image
    "pipeline.data.faces.MissingFaceGeometry",  # caught by the writer, counted as skipped
}


def _package_exceptions() -> list[type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("pipeline."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def _dispatch_to(monkeypatch, run) -> None:
    """Make ``cli.main`` dispatch any command line to ``run``."""
    parser = argparse.ArgumentParser()
    monkeypatch.setattr(
        parser, "parse_args", lambda argv: argparse.Namespace(command="demo", _run=run)
    )
    monkeypatch.setattr(cli, "build_parser", lambda argv: parser)


def test_every_package_error_is_a_user_error_or_listed_as_internal():
    classes = _package_exceptions()
    assert len(classes) >= 10, classes  # the walk found the package's errors
    outside = [
        f"{c.__module__}.{c.__qualname__}"
        for c in classes
        if not issubclass(c, UserError) and f"{c.__module__}.{c.__qualname__}" not in INTERNAL
    ]
    assert outside == [], f"subclass pipeline.errors.UserError (or list as internal): {outside}"


def test_cli_prints_a_user_error_in_one_line_and_exits_2(monkeypatch, capsys):
    class Moved(UserError):  # a class the CLI has never heard of by name
        pass

    def run(_args):
        raise Moved("file 'x.yaml': key 'a' is unknown; use 'b'")

    _dispatch_to(monkeypatch, run)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err == "pipeline demo: error: file 'x.yaml': key 'a' is unknown; use 'b'\n"


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    def run(_args):
        raise KeyError("a bug")

    _dispatch_to(monkeypatch, run)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["demo"])
