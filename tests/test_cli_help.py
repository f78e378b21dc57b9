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


def test_no_help_shows_its_default_twice() -> None:
    """A help text that already says its default ("(default: $ECOMREC_DATA_DIR)") gets no
    second "(default: None)" from ArgumentDefaultsHelpFormatter; None is never shown; a
    real default is still shown once."""
    import re

    twice, none = [], []
    n_shown = 0
    for path, parser, action in _walk(build_parser(), []):
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        text = parser._get_formatter()._expand_help(action)
        k = len(re.findall(r"\(default", text, flags=re.IGNORECASE))
        n_shown += k
        if k > 1 or text.lower().count("default:") > 1:
            twice.append((" ".join(path), action.option_strings, text))
        if "(default: None)" in text:
            none.append((" ".join(path), action.option_strings, text))
    assert not twice, twice
    assert not none, none
    assert n_shown > 50
    # also through the formatted --help pages (line wrapping included)
    data = build_parser()._subparsers._group_actions[0].choices["data"]  # type: ignore[union-attr]
    sub = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    page = " ".join(sub.choices["import"].format_help().split())
    assert "(default: $ECOMREC_DATA_DIR) (default" not in page
    assert page.count("(default: $ECOMREC_DATA_DIR)") == 1


def test_benchmarks_use_the_once_formatter() -> None:
    """Benchmark scripts build their own parsers: they take ecomrec.cli.HelpFormatter (the
    default shown once), never the plain ArgumentDefaultsHelpFormatter."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    plain = [
        p.name
        for p in sorted(root.glob("*.py"))
        if "ArgumentDefaultsHelpFormatter" in p.read_text()
    ]
    assert not plain, plain
    from ecomrec.cli import HelpFormatter

    ap = argparse.ArgumentParser(formatter_class=HelpFormatter)
    ap.add_argument("--a", default=None, help="folder (default: $X)")
    ap.add_argument("--b", type=int, default=3, help="count")
    ap.add_argument("--c", default=None, help="not given: nothing")
    page = " ".join(ap.format_help().split())
    assert "folder (default: $X) --b" in page and "count (default: 3)" in page
    assert "not given: nothing" in page and "(default: None)" not in page
