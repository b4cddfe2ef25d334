"""The install machinery without installing anything: lock file, version ranges, --help texts.

requirements/constraints.txt must pin every requirement of pyproject.toml inside its range, and
the venv the tests run in must match it (what scripts/check_lock.py reports to setup.sh).
setup.sh, lock.sh and the mismatch paths run against a stand-in venv whose ``python`` is this
interpreter except for ``-m pip``, which is only recorded, so nothing is ever installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

LOCK = REPO / "requirements" / "constraints.txt"
PYPROJECT = REPO / "pyproject.toml"
CHECK_LOCK = REPO / "scripts" / "check_lock.py"


def _check_lock_module():
    spec = importlib.util.spec_from_file_location("check_lock", CHECK_LOCK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    return [Requirement(line) for line in lines]


def _run(args, env=None, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=cwd, timeout=timeout)


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def _stand_in_venv(path: Path, freeze: str = "") -> Path:
    """A venv directory whose python runs this interpreter, but records ``-m pip`` calls (to
    pip.log) and answers ``pip freeze`` with ``freeze``."""
    (path / "bin").mkdir(parents=True)
    (path / "freeze.txt").write_text(freeze)
    python = path / "bin" / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [[ "${{1:-}} ${{2:-}}" == "-m pip" ]]; then
    echo "${{*:3}}" >>"{path}/pip.log"
    [[ " $* " == *" freeze "* ]] && cat "{path}/freeze.txt"
    exit 0
fi
exec "{sys.executable}" "$@"
""")
    python.chmod(0o755)
    return path


# --- (a) the lock and the ranges agree ---------------------------------------------------------

def test_every_pyproject_requirement_is_pinned_inside_its_range():
    pins = _check_lock_module().read_lock(LOCK)
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins, "torch's build is the installer's choice; the lock must not pin it"
            continue
        assert name in pins, f"{req.name} is required by pyproject.toml but not pinned in {LOCK.name}"
        locked = next(iter(pins[name].specifier)).version
        assert req.specifier.contains(locked, prereleases=True), \
            f"{LOCK.name} pins {req.name}=={locked}, outside pyproject.toml's {req.specifier}"


def test_every_requirement_has_a_bounded_range():
    for req in _pyproject_requirements():
        operators = {spec.operator for spec in req.specifier}
        assert ">=" in operators and "<" in operators, f"{req}: give a lower and an upper bound"


def test_lock_file_is_sorted_with_a_header():
    lines = LOCK.read_text().splitlines()
    assert lines[0].startswith("#") and "scripts/lock.sh" in "\n".join(lines[:6])
    pins = [line for line in lines if line and not line.startswith("#")]
    names = [canonicalize_name(Requirement(line).name) for line in pins]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "bloom-megatron" not in names and "torch" not in names


# --- (c) mismatch detection -----------------------------------------------------------------------

def test_the_test_venv_matches_the_lock():
    result = _run([sys.executable, CHECK_LOCK, "--constraints", LOCK, "--pyproject", PYPROJECT,
                   "--extras", "test,plot,wandb", "--project"])
    assert (result.returncode, result.stdout) == (0, ""), \
        f"the venv differs from {LOCK.name}; bash scripts/setup.sh repairs it:\n{result.stderr}"


def test_a_wrong_installed_version_is_reported(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a version nobody has\npyyaml==0.0.1\nnumpy==" + _version("numpy") + "\nno-such-package==1.0\n")
    result = _run([sys.executable, CHECK_LOCK, "--constraints", lock])
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["lock pyyaml==0.0.1", "lock no-such-package==1.0"]
    assert f"installed {_version('pyyaml')}" in result.stderr and "no-such-package" in result.stderr


def test_a_torch_other_than_asked_for_is_reported():
    result = _run([sys.executable, CHECK_LOCK, "--torch", "torch==0.0.1"])
    assert (result.returncode, result.stdout) == (1, "torch torch==0.0.1\n")


@pytest.mark.parametrize("text, message", [
    ("pyyaml>=6\n", "expected NAME==VERSION"),
    ("pyyaml==6.0.4\nPyYAML==6.0.4\n", "pinned twice"),
    ("pyyaml==0.0.1\n", "outside"),  # a pin no pyproject range allows
])
def test_an_unusable_lock_is_refused_with_the_fix(tmp_path, text, message):
    lock = tmp_path / "constraints.txt"
    lock.write_text(text)
    result = _run([sys.executable, CHECK_LOCK, "--constraints", lock, "--pyproject", PYPROJECT])
    assert result.returncode == 2 and result.stdout == ""
    assert str(lock) in result.stderr and message in result.stderr and "lock.sh" in result.stderr


# --- (b) --help texts ---------------------------------------------------------------------------

@pytest.mark.parametrize("script, flag", [("setup.sh", "--help"), ("setup.sh", "-h"), ("test.sh", "--help"),
                                          ("demo.sh", "--help"), ("demo.sh", "-h"), ("lock.sh", "--help"),
                                          ("flax_check.sh", "--help")])
def test_help_prints_usage_and_does_nothing_else(tmp_path, script, flag):
    venv = tmp_path / "venv"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = _run(["bash", REPO / "scripts" / script, flag], env={"BLOOM_VENV": str(venv)}, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: bash scripts/" + script)
    assert not venv.exists() and not any(cwd.iterdir())


def test_setup_help_names_its_environment():
    usage = _run(["bash", REPO / "scripts" / "setup.sh", "--help"]).stdout
    for variable in ("BLOOM_VENV", "PYTHON", "TORCH_SPEC", "TORCH_INDEX_URL", "download.pytorch.org/whl/cpu"):
        assert variable in usage


# --- setup.sh and lock.sh against a stand-in venv -------------------------------------------------

def test_setup_with_everything_in_place_installs_nothing_quickly(tmp_path):
    venv = _stand_in_venv(tmp_path / "venv")
    start = time.perf_counter()
    result = _run(["bash", REPO / "scripts" / "setup.sh"], env={"BLOOM_VENV": str(venv)})
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout and not (venv / "pip.log").exists()
    assert elapsed < 3, f"a setup.sh run with nothing to do took {elapsed:.1f} s"


@pytest.mark.parametrize("index_url", ["", "https://download.pytorch.org/whl/cpu"])
def test_setup_installs_the_torch_asked_for_and_fails_when_it_stays_wrong(tmp_path, index_url):
    venv = _stand_in_venv(tmp_path / "venv")
    env = {"BLOOM_VENV": str(venv), "TORCH_SPEC": "torch==0.0.1", "TORCH_INDEX_URL": index_url}
    result = _run(["bash", REPO / "scripts" / "setup.sh"], env=env)
    pip_calls = (venv / "pip.log").read_text().splitlines()
    if index_url:
        assert pip_calls[0].endswith(f"install --index-url {index_url} torch==0.0.1")
    else:
        assert pip_calls[0].endswith(f"install -c {LOCK} torch==0.0.1")
    # The recorded pip changed nothing, so the check after installing still finds torch wrong.
    assert result.returncode == 1
    assert "still differs" in result.stderr and "torch torch==0.0.1" in result.stderr


FREEZE = """\
zlib-ng==1.0
torch==2.13.0+cpu
PyYAML==6.0.4
nvidia-cublas-cu12==12.8.4.1
bloom-megatron==0.1.0
triton==3.5.0
absl-py==2.5.1
typing_extensions==4.16.0
typing-inspection==0.4.5
"""


def test_lock_keeps_what_the_installer_does_not_choose_sorted(tmp_path):
    venv = _stand_in_venv(tmp_path / "venv", FREEZE)
    out = tmp_path / "constraints.txt"
    result = _run(["bash", REPO / "scripts" / "lock.sh", "--output", out], env={"BLOOM_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "absl-py==2.5.1", "PyYAML==6.0.4", "typing_extensions==4.16.0", "typing-inspection==0.4.5", "zlib-ng==1.0"]
    again = _run(["bash", REPO / "scripts" / "lock.sh", "--check", "--output", out], env={"BLOOM_VENV": str(venv)})
    assert again.returncode == 0, again.stdout + again.stderr


def test_lock_refuses_packages_installed_from_files(tmp_path):
    venv = _stand_in_venv(tmp_path / "venv", FREEZE + "mypkg @ https://example.org/mypkg-1.0-py3-none-any.whl\n")
    out = tmp_path / "constraints.txt"
    result = _run(["bash", REPO / "scripts" / "lock.sh", "--output", out], env={"BLOOM_VENV": str(venv)})
    assert result.returncode != 0 and "mypkg @ https://" in result.stderr and not out.exists()
