"""Every option of every ``ecomrec`` command has help text and ``--help`` shows defaults."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ecomrec.cli import build_parser


def _walk(
    p: argparse.ArgumentParser, path: list[str]
) -> Iterator[tuple[list[str], argparse.ArgumentParser, argparse.Action]]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _walk(sp, [*path, name])
        elif not isinstance(a, argparse._HelpAction):
            yield path, p, a


def test_every_option_has_help_and_shows_its_default() -> None:
    missing = []
    n = 0
    for path, parser, action in _walk(build_parser(), []):
        n += 1
        if not action.help:
            missing.append((" ".join(path), action.option_strings or action.dest))
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), path
    assert n > 100 and not missing, missing
    text = build_parser()._subparsers._group_actions[0].choices["data"].format_help()  # type: ignore[union-attr]
    assert "import" in text and "synth" in text
    synth = (
        build_parser()._subparsers._group_actions[0].choices["data"]  # type: ignore[union-attr]
    )
    sub = next(a for a in synth._actions if isinstance(a, argparse._SubParsersAction))
    assert "(default: 400)" in sub.choices["synth"].format_help()


def test_no_command_defaults_to_a_bundled_dataset() -> None:
    for path, _, action in _walk(build_parser(), []):
        if "--dataset" in action.option_strings and path != ["demo"]:
            assert action.required or action.default is None, path
