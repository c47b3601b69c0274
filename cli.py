"""The command-line convention every script shares (chapters, train.py, bench.py).

A bad value is refused by argparse before any work starts: its own one-line `error:` names the flag and what is
allowed, exit status 2, no traceback. Paths are checked up front. Errors raised deep in the code for API users
stay ValueErrors naming the parameter; `flag_error` maps them to the flag the user typed. Ctrl-C ends with one
line (`run`). Help texts never spell out defaults: `HelpFormatter` appends "(default: ...)" once.

Usage in a script:

    p = argparse.ArgumentParser(description=__doc__.split("\\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--steps", type=cli.positive_int, default=400, help="training steps")
    args = p.parse_args(argv)
    ...
    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each default once and keeps the description's line breaks. A usage longer than two lines
    (a chapter has dozens of flags) shrinks to `usage: prog [options]`, so an error is two short lines; `--help`
    still lists every flag below it."""

    def _format_usage(self, usage, actions, groups, prefix):
        text = super()._format_usage(usage, actions, groups, prefix)
        if usage is None and text.strip().count("\n") > 1:
            pos = " ".join(a.metavar if isinstance(a.metavar, str) else a.dest for a in actions if not a.option_strings)
            text = super()._format_usage(f"%(prog)s [options] {pos}".rstrip(), actions, groups, prefix)
        return text

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.nargs == 0:  # flags, unset options
            return action.help
        if isinstance(action.default, (list, tuple)):  # as typed: 0,1,2
            return f"{action.help} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _number(kind, s: str, what: str, ok):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if not ok(v) or (isinstance(v, float) and v != v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return v


def positive_int(s: str) -> int:
    return _number(int, s, "an integer >= 1", lambda v: v >= 1)


def nonneg_int(s: str) -> int:
    return _number(int, s, "an integer >= 0", lambda v: v >= 0)


def positive_float(s: str) -> float:
    return _number(float, s, "a number > 0", lambda v: 0 < v < float("inf"))


def nonneg_float(s: str) -> float:
    return _number(float, s, "a number >= 0", lambda v: 0 <= v < float("inf"))


def fraction(s: str) -> float:
    return _number(float, s, "a number in [0, 1]", lambda v: 0 <= v <= 1)


def _list(item, s: str) -> list:
    parts = [x.strip() for x in s.split(",")]
    if not parts or any(x == "" for x in parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
    return [item(x) for x in parts]


def positive_int_list(s: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; every item an integer >= 1."""
    return _list(positive_int, s)


def nonneg_int_list(s: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (seeds); every item an integer >= 0."""
    return _list(nonneg_int, s)


def positive_float_list(s: str) -> list[float]:
    return _list(positive_float, s)


def out_dir(s: str) -> str:
    """A directory that exists or can be created: no file in the way, the nearest existing parent writable."""
    path = os.path.abspath(s)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise argparse.ArgumentTypeError(f"{s!r}: {probe!r} is a file, a directory is needed")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{s!r}: {probe!r} is not writable")
    return s


def out_file(s: str) -> str:
    """A file to write: its directory exists and is writable, and the path is not a directory."""
    path = os.path.abspath(s)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{s!r} is a directory, a file path is needed")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{s!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{s!r}: directory {parent!r} is not writable")
    return s


def in_file(s: str) -> str:
    """A file that exists and can be read."""
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"{s!r}: no such file")
    if not os.access(s, os.R_OK):
        raise argparse.ArgumentTypeError(f"{s!r}: not readable")
    return s


def key_value(s: str) -> tuple[str, object]:
    """'hidden_size=128' -> ('hidden_size', 128): the value is read as JSON (numbers, true/false, null, lists,
    quoted strings), else kept as a plain string ('scoring_func=sigmoid')."""
    key, sep, value = s.partition("=")
    if not sep or not key.strip() or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value with a name as key, got {s!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def flag_error(parser: argparse.ArgumentParser, err: Exception, flags: dict[str, str]) -> None:
    """Turn an API ValueError into argparse's one-line error on the flag the user typed (exits 2).

    `flags` maps the API's parameter names to flags, e.g. {"num_experts_per_tok": "--top-k"}. The mapped name
    that comes first in the message is the flag the error is reported on; every mapped name in the message (with
    any `Owner.` prefix) is replaced by its flag. A message naming none of them passes through unchanged.
    """
    msg = str(err)
    pattern = {name: rf"(?:\b[A-Za-z_]\w*\.)?\b{re.escape(name)}\b" for name in flags}  # also `ModelConfig.name`
    found = sorted((m.start(), flags[name]) for name, pat in pattern.items() for m in [re.search(pat, msg)] if m)
    for name, pat in pattern.items():
        msg = re.sub(pat, flags[name], msg)
    if found:
        parser.error(f"argument {found[0][1]}: {msg}")
    parser.error(msg)


def run(main, argv=None) -> None:
    """Call `main(argv)`; Ctrl-C ends with one line and exit status 130 instead of a traceback."""
    try:
        sys.exit(main(argv))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
