"""requirements/lock.txt: every requirement of setup.cfg (install_requires, extras all and dev) is pinned
there at a version that satisfies it, torch is the 2.13.0 CPU build, and no CUDA package is locked.
Regenerate with `make lock` when this fails after a change to setup.cfg or the constraints."""
import configparser
import importlib.util
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REMEDY = "run `make lock` (and commit requirements/lock.txt)"


def _lock_module():
    spec = importlib.util.spec_from_file_location("_mert_lock", ROOT / "requirements" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _lock_module()
PINS = lock.read_lock(str(ROOT / "requirements" / "lock.txt"))


def _requirements(text: str):
    return [Requirement(line.strip()) for line in text.strip().splitlines() if line.strip()]


def _setup_cfg_requirements():
    cfg = configparser.ConfigParser()  # interpolates %(teachers)s etc. as setuptools does
    cfg.read(ROOT / "setup.cfg")
    reqs = _requirements(cfg["options"]["install_requires"])
    for extra in lock.EXTRAS:
        reqs += _requirements(cfg["options.extras_require"][extra])
    return reqs


def _check(req: Requirement, where: str):
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None  # not for this interpreter / platform
    name = lock.canonical(req.name)
    if name not in PINS:
        return f"{req} ({where}) has no pin in requirements/lock.txt"
    if not req.specifier.contains(Version(PINS[name]), prereleases=True):
        return f"{req} ({where}) is not satisfied by the lock's {name}=={PINS[name]}"
    return None


def test_every_setup_cfg_requirement_is_pinned_at_a_version_that_satisfies_it():
    reqs = _setup_cfg_requirements()
    assert len(reqs) > 20
    problems = [p for p in (_check(r, "setup.cfg") for r in reqs) if p]
    assert not problems, "\n".join(problems) + f"\n{REMEDY}"


def test_the_lock_agrees_with_the_constraints():
    reqs = _requirements("\n".join(line.split("#", 1)[0] for line in
                                   (ROOT / "requirements" / "constraints.txt").read_text().splitlines()))
    problems = [p for p in (_check(r, "constraints.txt") for r in reqs if lock.canonical(r.name) in PINS) if p]
    assert not problems, "\n".join(problems) + f"\n{REMEDY}"


def test_torch_is_the_2_13_0_cpu_build_and_nothing_is_cuda_only_or_the_project():
    torch = Version(PINS["torch"])
    assert torch.public == "2.13.0" and torch.local == "cpu", PINS["torch"]
    assert not [n for n in PINS if lock.CUDA_ONLY.match(n)]
    assert lock.PROJECT not in PINS  # installed editable, never pinned
    assert all(tool in PINS for tool in lock.TOOLS)


def test_lock_lines_are_sorted_exact_pins():
    lines = [l for l in (ROOT / "requirements" / "lock.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert [lock.canonical(l.split("==")[0]) for l in lines] == sorted(PINS)
    for version in PINS.values():
        Version(version)  # exact versions only: a range or a second specifier does not parse


def test_a_stale_lock_is_caught():
    assert "is not satisfied by the lock's numpy==" in _check(Requirement("numpy>=99"), "setup.cfg")
    assert "has no pin" in _check(Requirement("no-such-package-anywhere"), "setup.cfg")
    assert _check(Requirement("pywin32; sys_platform == 'win32'"), "setup.cfg") is None


@pytest.mark.skipif(not (Path(sys.prefix) / ".mert-installed").exists(),
                    reason="not the environment `make venv` built from the lock")
def test_this_environment_is_the_locked_one():
    problems = lock.problems(PINS)
    assert not problems, "\n".join(problems) + "\nrun `make venv` (or `make lock` if setup.cfg changed)"
