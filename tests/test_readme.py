"""The README's commands: the cheap ones run as written, every flag of the others must exist."""

import re
import shlex
import subprocess

import click
import pytest

from fklip.cli import cli
from tests.conftest import ROOT, run_fklip

README = (ROOT / "README.md").read_text()
# Commands run for real, in order, in one folder (later examples read what earlier ones wrote).
CHEAP = ("demo", "train", "extract", "predict", "eval", "export", "data demo", "data inspect", "data models",
         "bench")


def readme_blocks(lang: str = "sh") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def readme_commands(prefix: str) -> list[list[str]]:
    """Shell commands of the README that start with `prefix`, continuation lines joined;
    `torchrun ... -m fklip ARGS` counts as `fklip ARGS`."""
    out = []
    env: dict[str, str] = {}  # as in one shell session: variables persist across blocks
    for block in readme_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
            if assignment:  # NAME=value lines set variables for the lines after them
                env[assignment[1]] = assignment[2]
                continue
            for name, value in env.items():
                line = line.replace("${" + name + "}", value).replace("$" + name, value)
            argv = shlex.split(line)
            if argv and argv[0] == "torchrun" and "-m" in argv:
                argv = [a for a in argv[argv.index("-m") + 1:] if a != "--"]
            if argv and argv[0] == prefix:
                out.append(argv)
    return out


def resolve(argv: list[str]) -> tuple[click.Command, list[str], str]:
    """The click command an argv names, the remaining args, and its path ("data demo")."""
    command, path, rest = cli, [], argv[1:]
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        path.append(rest[0])
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest, " ".join(path)


def test_quick_start_comes_first_and_matches_ci():
    first = readme_blocks()[0].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert README.index("## Quick start") < README.index("## What fklip is")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh\n" in ci


def test_every_readme_flag_exists():
    commands = readme_commands("fklip")
    assert len(commands) >= 8
    for argv in commands:
        command, rest, path = resolve(argv)
        assert path, f"README command {argv} names no fklip command"
        known = {opt for p in command.params for opt in p.opts + p.secondary_opts}
        for token in rest:
            if token.startswith("--"):
                assert token.split("=")[0] in known, f"README uses {token} but `fklip {path}` lacks it"


def test_cheap_readme_commands_run(tmp_path):
    ran = []
    for argv in readme_commands("fklip"):
        _, _, path = resolve(argv)
        if path not in CHEAP:
            continue
        result = run_fklip(*argv[1:], cwd=tmp_path)
        assert result.returncode == 0, (argv, result.stderr[-2000:])
        ran.append(path)
    assert set(ran) == set(CHEAP)
    import json

    before, after = (json.loads((tmp_path / "fklip-demo" / d / "metrics.json").read_text())
                     for d in ("eval-before", "eval"))
    assert after["mean_recall"] > before["mean_recall"] + 20  # the demo's training visibly lifts recall
    # the demo's export, evaluated through the onnx engine, and the README's: the recall of torch
    demo_onnx = json.loads((tmp_path / "fklip-demo" / "eval-onnx" / "metrics.json").read_text())
    readme_onnx = json.loads((tmp_path / "eval-onnx" / "metrics.json").read_text())
    assert demo_onnx["checkpoint"]["engine"] == readme_onnx["checkpoint"]["engine"] == "onnx"
    assert demo_onnx["mean_recall"] == after["mean_recall"]
    assert readme_onnx["text_to_image"] == after["text_to_image"]


def test_readme_layout_matches_demo_output(tmp_path):
    block = next(b for b in readme_blocks("text") if b.startswith("demo-data/"))
    listed = {line.split()[0] for line in block.splitlines()[1:] if line.strip()}
    from fklip.data.demo_dataset import demo_paths

    paths = demo_paths(tmp_path, 64)
    actual = {str(p.relative_to(tmp_path)) for p in [*paths.files().values(), paths.manifest]}
    assert listed == actual


@pytest.mark.parametrize("script", ["scripts/demo.sh", "scripts/test.sh"])
def test_setup_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)], check=False).returncode == 0
