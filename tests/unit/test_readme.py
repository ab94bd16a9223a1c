"""The README and docs/ as a newcomer uses them: every command in a fenced shell block runs as written.

Each command of a ```bash / ```sh / ```shell block of README.md and docs/**/*.md is checked without running it:
`raytrain ...` parses with the real command line (`raytrain.cli.main`'s own dispatch, stopped right after its
parser returns; a parse error or `--help` fails), and a pipeline YAML it names validates with its `-o` overrides
and the phases it names; `make X` names a Makefile target; `python bench/X.py ...` names a script whose
argparse accepts the arguments; every repository path a command names (configs/..., bench/..., cluster.yaml)
exists. Every relative markdown link points to an existing file (and heading, for `file.md#anchor`), and the
README stays a guide: at most 260 lines. No Ray is started.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
MAX_README_LINES = 260

SHELL_FENCES = {"bash", "sh", "shell"}
# Programs whose commands are not parsed here (another tool's CLI); their repository paths are still checked.
OTHER_PROGRAMS = {"mlflow", "ray", "pip", "git", "code", "sudo", "apt-get", "cd", "export", "ls", "cat"}
# Files at the repository root a command may name; any token under these folders must exist too.
ROOT_FILES = {"cluster.yaml", "constraints.txt", "Makefile", "pyproject.toml"}
REPO_DIRS = ("configs/", "bench/", "tests/", "docs/", "datasets_prep/", "raytrain/")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def shell_commands(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, command) for every command of the file's fenced shell blocks: comments dropped,
    `\\`-continued lines joined."""
    fence: str | None = None
    pending, start = "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = stripped[3:].strip().lower() or "text"
            else:
                fence = None
            continue
        if fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command = (pending + stripped).strip()
        pending = ""
        if command and not command.startswith("#"):
            yield start, command


def _all_commands() -> list[tuple[str, str]]:
    return [(f"{_rel(path)}:{number}", command) for path in [README, *DOCS]
            for number, command in shell_commands(path)]


COMMANDS = _all_commands()


class _Parsed(BaseException):  # a BaseException, so that no `except Exception` of the code under test catches it
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    """argparse's parse_args / parse_intermixed_args raise `_Parsed(namespace)` instead of returning, so the
    program's own code up to its parse runs, and nothing after it."""
    def stop(parse: Callable[..., argparse.Namespace]) -> Callable[..., argparse.Namespace]:
        def parse_and_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> argparse.Namespace:
            raise _Parsed(parse(self, *args, **kwargs))
        return parse_and_stop

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop(argparse.ArgumentParser.parse_args)), \
            mock.patch.object(argparse.ArgumentParser, "parse_intermixed_args",
                              stop(argparse.ArgumentParser.parse_intermixed_args)):
        yield


def parse_with(run: Callable[[], Any], what: str) -> argparse.Namespace:
    """The namespace `run`'s argument parser returns; AssertionError with argparse's message when it exits
    instead (a parse error, or --help)."""
    err, out = io.StringIO(), io.StringIO()
    saved_path = list(sys.path)
    try:
        with _stop_after_parsing(), mock.patch.dict(os.environ), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(out):
            run()
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as exc:
        if exc.code == 0:
            raise AssertionError(f"{what}: prints its help and exits; show the command as it runs") from None
        text = (err.getvalue() or out.getvalue()).strip().splitlines()
        raise AssertionError(f"{what}: the parser exits ({exc.code}) instead of returning: "
                             f"{text[-1] if text else ''}") from None
    finally:
        sys.path[:] = saved_path
    raise AssertionError(f"{what}: returned without parsing any arguments")


def _tokens(command: str) -> list[str]:
    tokens = shlex.split(command, comments=True)
    while tokens and (tokens[0] == "time" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0])):
        tokens = tokens[1:]  # `time cmd`, `VAR=value cmd`
    return tokens


def _check_paths(tokens: list[str], where: str) -> None:
    for token in tokens:
        value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else token
        if "<" in value or "*" in value:
            continue  # a placeholder: runs/<pipeline>/<run_id>, configs/pipelines/*_tiny.yaml
        if value in ROOT_FILES or value.startswith(REPO_DIRS):
            assert (ROOT / value).exists(), f"{where}: {value} does not exist"


def _pipeline(path: str, overrides: list[str], where: str) -> Any:
    from raytrain.config.loader import ConfigError, load_config

    try:
        return load_config(ROOT / path, overrides)
    except ConfigError as exc:
        raise AssertionError(f"{where}: {path} {' '.join('-o ' + o for o in overrides)}: {exc}") from None


def _phase_names(cfg: Any) -> list[str]:
    return [phase.name for phase in cfg.phases]


def check_raytrain(argv: list[str], where: str) -> None:
    from raytrain import cli

    args = parse_with(lambda: cli.main(argv), f"{where}: raytrain {shlex.join(argv)}")
    config = getattr(args, "config", None)
    if isinstance(config, str) and config.startswith("configs/pipelines/") and "<" not in config:
        cfg = _pipeline(config, list(getattr(args, "override", None) or []), where)
        names = _phase_names(cfg)
        wanted = [p.strip() for p in (getattr(args, "phases", None) or "").split(",") if p.strip()]
        if getattr(args, "ckpt_command", None) == "diff":
            wanted.append(args.phase)
        for name in wanted:
            assert name in names, f"{where}: {config} has no phase {name!r} (its phases: {', '.join(names)})"
        if getattr(args, "sweep", None):
            from raytrain.config.sweep import load_sweep

            sweep = load_sweep(ROOT / args.sweep)
            assert sweep.phase in names, f"{where}: {args.sweep} sweeps phase {sweep.phase!r}, not in {config}"
    source = getattr(args, "source", None)  # raytrain infer runs/<pipeline>/... --phase P
    if argv[:1] == ["infer"] and args.phase and isinstance(source, str) and source.startswith("runs/"):
        pipeline = ROOT / "configs" / "pipelines" / f"{source.split('/')[1]}.yaml"
        if pipeline.exists():
            names = _phase_names(_pipeline(_rel(pipeline), [], where))
            assert args.phase in names, f"{where}: {_rel(pipeline)} has no phase {args.phase!r}"


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M)}


def check_python(argv: list[str], where: str) -> None:
    assert argv and argv[0].startswith("bench/") and argv[0].endswith(".py"), \
        f"{where}: `python {shlex.join(argv)}`: only `python bench/NAME.py ...` is checked here"
    script = ROOT / argv[0]
    assert script.exists(), f"{where}: {argv[0]} does not exist"

    def run() -> None:
        with mock.patch.object(sys, "argv", [str(script), *argv[1:]]):
            runpy.run_path(str(script), run_name="__main__")

    args = parse_with(run, f"{where}: python {shlex.join(argv)}")
    if argv[0] == "bench/recipes.py":  # what its main() checks after parsing
        sys.path.insert(0, str(ROOT))
        try:
            from bench.recipes import BARS
        finally:
            sys.path.remove(str(ROOT))
        assert args.all or args.recipes, f"{where}: bench/recipes.py needs a recipe name or --all"
        unknown = [name for name in args.recipes if name not in BARS]
        assert not unknown, f"{where}: bench/recipes.py knows no recipe {unknown} (it has {', '.join(BARS)})"


def check_command(command: str, where: str) -> None:
    tokens = _tokens(command)
    assert tokens, f"{where}: empty command {command!r}"
    _check_paths(tokens, where)
    program, rest = tokens[0], tokens[1:]
    if program == "raytrain":
        check_raytrain(rest, where)
    elif program == "make":
        unknown = [t for t in rest if not t.startswith("-") and "=" not in t and t not in make_targets()]
        assert not unknown, f"{where}: the Makefile has no target {', '.join(unknown)}"
    elif program in {"python", "python3"}:
        check_python(rest, where)
    elif program in OTHER_PROGRAMS:
        if "--" in rest:  # `ray job submit ... -- raytrain run ...`
            check_command(shlex.join(rest[rest.index("--") + 1:]), where)
    else:
        raise AssertionError(f"{where}: {program!r} is not a program this test knows: {command}")


@pytest.mark.parametrize("where,command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_command_runs_as_written(where: str, command: str) -> None:
    check_command(command, where)


def test_readme_commands_are_found() -> None:
    readme = [command for where, command in COMMANDS if where.startswith("README.md:")]
    for verb in ("make demo", "make test", "raytrain prep", "raytrain plan", "raytrain run", "raytrain infer",
                 "mlflow ui"):
        assert any(c.startswith(verb) for c in readme), f"README.md shows no `{verb}` command"


def test_readme_is_a_guide() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, (f"README.md has {lines} lines (at most {MAX_README_LINES}): move the "
                                       "detail into docs/")


def _without_code(text: str) -> str:
    text = re.sub(r"^ {0,3}```.*?^ {0,3}```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file: its headings' and its `<a id="...">`."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^ {0,3}```.*?^ {0,3}```", "", path.read_text(encoding="utf-8"),
                       flags=re.M | re.S).splitlines():
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))  # an explicit anchor
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links() -> list[tuple[str, str]]:
    out = []
    for path in [README, *DOCS]:
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(path.read_text("utf-8"))):
            out.append((_rel(path), m.group(1)))
    return out


LINKS = _links()


@pytest.mark.parametrize("source,target", LINKS, ids=[f"{s}->{t}" for s, t in LINKS])
def test_relative_links_resolve(source: str, target: str) -> None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return  # https:, mailto:
    file, _, anchor = target.partition("#")
    resolved = (ROOT / source).parent / file if file else ROOT / source
    assert resolved.exists(), f"{source}: link to {target}: {_rel(resolved.resolve())} does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), (f"{source}: link to {target}: {_rel(resolved.resolve())} has no heading "
                                             f"#{anchor}")
