"""The README's commands run as written (issue 10 item 11): every script or module they call exists, every flag they
pass is accepted by that script's parser, every config key they set is one pretrain.py knows; the commands after
the quick start run inside the activated .venv, which the README says how to set up; every dataset builder and
offline generator has a command; the quick start's measured result is quoted as the script prints it."""

import argparse
import glob
import os
import re
import runpy
import shlex
import sys

import pytest

from models.arch import INJECTED_ARCH_FIELDS
from training.config import PretrainConfig, compose_raw
from utils.functions import load_model_class
from utils.stats import wilson_interval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
CFG = os.path.join(REPO, "config", "cfg_pretrain.yaml")
SEPARATORS = {"|", "||", "&&", ";", ">", "<", "2>&1"}


def readme_text() -> str:
    with open(README) as f:
        return f.read()


def command_lines(text: str):
    """The shell command lines of the README: bash blocks (continuations joined, comments dropped) and inline
    `python ...` / `bash ...` / `torchrun ...` spans."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
            if line:
                lines.append(line)
    lines += re.findall(r"`((?:python|bash|torchrun) [^`]+)`", text)
    return lines


def invocations(text: str):
    """(kind, target, args) of every program the commands run: ("script", path, args), ("module", name, args),
    ("bash", path, args)."""
    found = []
    for line in command_lines(text):
        tokens = shlex.split(line)
        for i, tok in enumerate(tokens):
            rest = tokens[i + 1:]
            if tok in ("python", "python3", ".venv/bin/python"):
                if rest[:1] == ["-m"]:
                    found.append(("module", rest[1], args_until_separator(rest[2:])))
                elif rest and rest[0] != "-":
                    found.append(("script", rest[0], args_until_separator(rest[1:])))
            elif tok in ("torchrun", ".venv/bin/torchrun"):
                script = next(j for j, t in enumerate(rest) if t.endswith(".py"))
                found.append(("script", rest[script], args_until_separator(rest[script + 1:])))
            elif tok == "bash" and rest:
                found.append(("bash", rest[0], args_until_separator(rest[1:])))
    return found


def args_until_separator(tokens):
    out = []
    for tok in tokens:
        if tok in SEPARATORS:
            break
        out.append(tok)
    return out


class _Parser(Exception):
    pass


def script_parser(kind: str, target: str) -> argparse.ArgumentParser:
    """The argparse parser that `python <script>` / `python -m <module>` builds, caught at its first parse."""
    def capture(self, *args, **kwargs):
        raise _Parser(self)

    original, saved_argv = argparse.ArgumentParser.parse_known_args, sys.argv
    argparse.ArgumentParser.parse_known_args = capture
    sys.argv = [target]
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=False)
        else:
            runpy.run_path(os.path.join(REPO, target), run_name="__main__")
    except _Parser as caught:
        return caught.args[0]
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = saved_argv
    raise AssertionError(f"{target} built no argparse parser")


def known_config_keys():
    """Every key pretrain.py takes: the training keys and the arch keys of every arch file."""
    keys = set(PretrainConfig.model_fields) - {"arch"} | {"arch.name", "arch.loss.name", "arch.loss.loss_type"}
    for path in glob.glob(os.path.join(REPO, "config", "arch", "*.yaml")):
        arch = compose_raw(CFG, [f"arch={os.path.splitext(os.path.basename(path))[0]}"])["arch"]
        fields = load_model_class(arch["name"]).config_class.model_fields
        keys |= {f"arch.{f}" for f in fields if f not in INJECTED_ARCH_FIELDS}
    return keys


def check_overrides(tokens, where, known):
    """`key=value` Hydra overrides: known keys, and `arch=<name>` a file in config/arch/."""
    for tok in tokens:
        if "$" in tok or "=" not in tok or tok.startswith("-"):
            continue
        key, value = tok.split("=", 1)
        key = key.lstrip("+")
        if key == "arch":
            assert os.path.isfile(os.path.join(REPO, "config", "arch", f"{value}.yaml")), f"{where}: {tok}"
        else:
            assert key in known, f"{where}: unknown config key in {tok}"


def test_every_command_calls_an_existing_program_with_accepted_flags():
    calls = invocations(readme_text())
    assert len(calls) > 20
    known = known_config_keys()
    checked = set()
    for kind, target, args in calls:
        where = f"README: {kind} {target} {' '.join(args)}"
        if kind == "module":
            assert os.path.isfile(os.path.join(REPO, *target.split(".")) + ".py"), where
        else:
            assert os.path.isfile(os.path.join(REPO, target)), where
        if kind == "bash" or "$" in " ".join(args):
            continue
        if target == "pretrain.py":
            check_overrides(args, where, known)
            continue
        parser = script_parser(kind, target)
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: rejected by its argument parser")
        check_overrides(getattr(parsed, "overrides", None) or [], where, known)
        checked.add(target)
    assert {"scripts/run_eval_only.py", "scripts/serve.py", "dataset.build_arc_dataset",
            "dataset/build_sudoku_dataset.py", "dataset.generate_maze"} <= checked


def test_commands_after_the_quick_start_run_in_the_activated_venv():
    text = readme_text()
    after_quick_start = text.split("\n## ", 2)[2]  # from the section after the quick start on
    first_python = min(after_quick_start.index(p) for p in ("\npython ", "\ntorchrun ") if p in after_quick_start)
    setup = after_quick_start[:first_python]
    assert "bash scripts/setup_env.sh" in setup and "source .venv/bin/activate" in setup


def test_every_dataset_builder_and_generator_has_a_command():
    documented = {target.replace(".", "/") + ".py" if kind == "module" else target
                  for kind, target, _ in invocations(readme_text())}
    for path in glob.glob(os.path.join(REPO, "dataset", "*.py")):
        name = os.path.relpath(path, REPO)
        if re.match(r"dataset/(build|generate)_\w+\.py$", name):
            assert name in documented, f"{name} has no command in the README"


def test_dataset_sizes_are_stated():
    datasets = readme_text().split("\n## Datasets", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"ARC build[^.]*\d+(\.\d+)? GB", datasets), "the ARC build's disk size is not stated"


def test_quick_start_result_is_quoted_as_the_script_prints_it():
    quick_start = readme_text().split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"Measured on (\d{4}-\d\d-\d\d)", quick_start)
    assert match, "the quick start's measurement has no date"
    line = re.search(r"`Quick start: all\.exact_accuracy (\d+\.\d\d)% \(95% Wilson CI \[(\d+\.\d\d)%, "
                     r"(\d+\.\d\d)%\], N=(\d+)\): held-out Sudoku puzzles", quick_start)
    assert line, "the quoted final line is not what scripts/quickstart.sh prints"
    p, lo, hi, n = float(line.group(1)) / 100, float(line.group(2)), float(line.group(3)), int(line.group(4))
    assert n == 1000
    assert (lo, hi) == tuple(round(100 * x, 2) for x in wilson_interval(p, n))  # a consistent quotation

