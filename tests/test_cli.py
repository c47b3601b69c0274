"""The command-line convention (cli.py), checked on every script's real parser: bad values are refused before any
work starts with exit status 2, one `error:` line naming the flag, no traceback; `--help` works and shows each
default once; every numeric flag refuses nonsense; Ctrl-C is one line.

Parse-level only: each script's `main(argv)` is called in-process and stops in argparse. Scripts that do not exist
yet (later chapters, train.py, bench.py) are skipped; when one lands, the generic checks cover it at once, and its
own bad values go in BAD below.
"""

import argparse
import importlib
import inspect
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["01_moe.py", "02_mla.py", "03_muonclip.py", "04_parallel.py", "05_data.py", "06_rl.py",
           "sandbox.py", "train.py", "bench.py"]
PRESENT = [s for s in SCRIPTS if (ROOT / s).exists()]

# (script, argv, flag the error must name). "README.md" is a file where a directory is needed; "tests" a directory
# where a file is needed.
BAD = [
    ("01_moe.py", ["--steps", "0"], "--steps"),
    ("01_moe.py", ["--steps", "-5"], "--steps"),
    ("01_moe.py", ["--log-every", "0"], "--log-every"),
    ("01_moe.py", ["--log-every", "500"], "--log-every"),  # > --steps: a table with no row
    ("01_moe.py", ["--sparsities", "1,abc"], "--sparsities"),
    ("01_moe.py", ["--sparsities", "1,,2"], "--sparsities"),
    ("01_moe.py", ["--top-k", "0"], "--top-k"),
    ("01_moe.py", ["--top-k", "17"], "--top-k"),  # more than the 16 experts: the API's ValueError, mapped
    ("01_moe.py", ["--lr", "nan"], "--lr"),
    ("01_moe.py", ["--bias-update-speed", "-0.1"], "--bias-update-speed"),
    ("01_moe.py", ["--preset", "gpt-4"], "--preset"),
    ("01_moe.py", ["--seeds", "0,-1"], "--seeds"),
    ("01_moe.py", ["--sparsity-sweep", "--figures-dir", "README.md"], "--figures-dir"),
    ("01_moe.py", ["--sparsity-sweep", "--eval-every", "700"], "--eval-every"),
    ("01_moe.py", ["--bench", "--preset", "kimi-k2"], "--preset"),
    ("02_mla.py", ["--context", "0"], "--context"),
    ("02_mla.py", ["--context", "-1"], "--context"),
    ("02_mla.py", ["--context", "9000"], "--context"),  # past the tiny model's 8192 positions
    ("02_mla.py", ["--decode-steps", "0"], "--decode-steps"),
    ("02_mla.py", ["--repeats", "x"], "--repeats"),
    ("02_mla.py", ["--threads", "-2"], "--threads"),
    ("02_mla.py", ["--preset", "kimi"], "--preset"),
    ("02_mla.py", ["--preset", "tiny", "--bench"], "--bench"),
    ("03_muonclip.py", ["--clip-steps", "-3"], "--clip-steps"),
    ("03_muonclip.py", ["--demo", "none"], "--demo"),
    ("03_muonclip.py", ["--tau", "0"], "--tau"),
    ("03_muonclip.py", ["--clip-wd", "-0.1"], "--clip-wd"),
    ("03_muonclip.py", ["--adamw-lrs", "1e-3,x"], "--adamw-lrs"),
    ("03_muonclip.py", ["--tokens-per-width", "1.5"], "--tokens-per-width"),
    ("03_muonclip.py", ["--widths", "32,48"], "--widths"),  # not a multiple of 32: the API's ValueError, mapped
    ("05_data.py", ["--n-tasks", "0"], "--n-tasks"),
    ("05_data.py", ["--out", "/missing/dir/x.jsonl"], "--out"),
    ("05_data.py", ["--out", "tests"], "--out"),
    ("05_data.py", ["--seeds", "0,a"], "--seeds"),
    ("05_data.py", ["--entities", "0"], "--entities"),
    ("05_data.py", ["--n", "-1"], "--n"),
    ("05_data.py", ["--rephrase-experiment", "--entities", "1"], "--entities"),
    ("05_data.py", ["--rephrase-experiment", "--top-k", "9"], "--top-k"),  # more than the 8 experts
    ("05_data.py", ["--rephrase-experiment", "--out", "x.jsonl"], "--out"),
]


def _main(script: str):
    return importlib.import_module(script.removesuffix(".py")).main


def _call(script: str, argv: list[str], monkeypatch) -> int:
    """Run the script's main(argv) in-process; returns its exit status (SystemExit expected)."""
    main = _main(script)
    monkeypatch.chdir(ROOT)
    if inspect.signature(main).parameters:
        call = lambda: main(argv)  # noqa: E731
    else:
        monkeypatch.setattr(sys, "argv", [script, *argv])
        call = main
    with pytest.raises(SystemExit) as exc:
        call()
    return exc.value.code


class _GotParser(Exception):
    pass


def _parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's real parser, caught as main() is about to parse (nothing after parsing runs)."""
    got = {}

    def grab(self, *a, **k):
        got["parser"] = self
        raise _GotParser

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", grab)
    main = _main(script)
    with pytest.raises(_GotParser):
        main([]) if inspect.signature(main).parameters else main()
    monkeypatch.undo()
    return got["parser"]


def _assert_refused(code, err: str, flag: str):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert flag in lines[0], err
    assert len(err.strip().splitlines()) <= 3, err  # short usage line + the error


@pytest.mark.parametrize("script,argv,flag", [b for b in BAD if b[0] in PRESENT],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_value_is_refused_with_one_line(script, argv, flag, monkeypatch, capsys):
    known = _parser(script, monkeypatch)._option_string_actions
    assert all(a in known for a in argv if a.startswith("--")), f"stale row: {script} has no flag in {argv}"
    code = _call(script, argv, monkeypatch)
    _assert_refused(code, capsys.readouterr().err, flag)


@pytest.mark.parametrize("script", PRESENT)
def test_help_works_and_shows_each_default_once(script, monkeypatch, capsys):
    assert _call(script, ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "(default: None)" not in out and "(default: False)" not in out
    parser = _parser(script, monkeypatch)
    assert parser.formatter_class is cli.HelpFormatter
    for action in parser._actions:
        assert action.help, f"{script}: {action.option_strings} has no help text"
        assert "(default" not in action.help, f"{script}: {action.option_strings} spells out its default"


INT_TYPES = (cli.positive_int, cli.nonneg_int, cli.positive_int_list, cli.nonneg_int_list)
FLOAT_TYPES = (cli.positive_float, cli.nonneg_float, cli.fraction, cli.positive_float_list)


@pytest.mark.parametrize("script", PRESENT)
def test_every_numeric_flag_refuses_nonsense(script, monkeypatch, capsys):
    parser = _parser(script, monkeypatch)
    numeric = [a for a in parser._actions if a.option_strings and a.type in INT_TYPES + FLOAT_TYPES + (int, float)]
    assert numeric, f"{script}: no numeric flags found"
    for action in numeric:
        flag = action.option_strings[-1]
        assert action.type not in (int, float), f"{script} {flag}: use a cli.py validator, not bare {action.type}"
        bad = ["abc", "-1"] + (["1.5"] if action.type in INT_TYPES else ["inf"])
        if action.type in (cli.positive_int, cli.positive_int_list, cli.positive_float, cli.positive_float_list):
            bad.append("0")
        for value in bad:
            code = _call(script, [flag, value], monkeypatch)
            _assert_refused(code, capsys.readouterr().err, flag)


@pytest.mark.parametrize("script", PRESENT)
def test_script_uses_the_shared_entry_point(script):
    src = (ROOT / script).read_text()
    assert 'if __name__ == "__main__":\n    cli.run(main)' in src, f"{script}: end with cli.run(main) (Ctrl-C = 1 line)"


@pytest.mark.parametrize("script", PRESENT)
def test_shared_flags_keep_one_meaning(script, monkeypatch):
    actions = {a.option_strings[-1]: a for a in _parser(script, monkeypatch)._actions if a.option_strings}
    if "--preset" in actions:
        assert set(actions["--preset"].choices) <= {"tiny", "kimi-k2", "deepseek-v3"}
    if "--seed" in actions:
        assert actions["--seed"].type is cli.nonneg_int
    if "--seeds" in actions:
        assert actions["--seeds"].type is cli.nonneg_int_list
    if "--threads" in actions:
        assert actions["--threads"].type in (cli.positive_int, cli.nonneg_int)
    for flag in ("--quick", "--no-figures"):
        if flag in actions:
            assert actions[flag].nargs == 0


def test_ctrl_c_is_one_line():
    """A real SIGINT to a real process whose main runs under cli.run: exit 130, one line, no traceback."""
    code = "import cli, time\ncli.run(lambda argv: (print('ready', flush=True), time.sleep(60)))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip() == "interrupted"


def test_flag_mapping_names_the_flag_the_user_typed(capsys):
    p = argparse.ArgumentParser(prog="x")
    with pytest.raises(SystemExit):
        cli.flag_error(p, ValueError("num_experts_per_tok must be in [1, n_routed_experts=4], got 9"),
                       {"n_routed_experts": "--experts", "num_experts_per_tok": "--top-k"})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "x: error: argument --top-k: --top-k must be in [1, --experts=4], got 9"


def test_path_validators(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert cli.out_dir(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    assert cli.out_file(str(tmp_path / "out.jsonl")) == str(tmp_path / "out.jsonl")
    assert cli.in_file(str(f)) == str(f)
    for fn, arg in ((cli.out_dir, f), (cli.out_dir, f / "sub"), (cli.out_file, tmp_path),
                    (cli.out_file, tmp_path / "missing" / "x.jsonl"), (cli.in_file, tmp_path / "nope"),
                    (cli.in_file, tmp_path)):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(str(arg))
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(argparse.ArgumentTypeError):
            cli.out_dir(str(ro / "x"))


def test_repository_ships_every_file_it_cites():
    """README, the scripts and the tests name only .md files that are in the repository (or cite a public URL)."""
    import re

    texts = [ROOT / "README.md", ROOT / "pyproject.toml", *ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]
    for path in texts:
        for name in re.findall(r"(?<![\w/.:-])([\w./-]+\.md)\b", path.read_text()):
            assert (ROOT / name).exists(), f"{path.name} cites {name}, which the repository does not contain"
