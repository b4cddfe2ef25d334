"""Say what an environment lacks against the lock file and the project's declared requirements.

Run it with the Python of the environment to check (it reads that interpreter's installed
distributions). scripts/setup.sh calls it before installing and, if it installed anything, once
more to verify, so that a run with nothing to do costs one interpreter start, not pip calls:

    .venv/bin/python scripts/check_lock.py --constraints requirements/constraints.txt \\
        --pyproject pyproject.toml --extras test,plot,wandb --torch 'torch==2.13.0' --project

Each thing to install is one line on stdout, ``KIND REQUIREMENT``:

    torch    torch==2.13.0             torch is missing or does not satisfy --torch
    lock     PyYAML==6.0.4             a locked package is missing or at another version
    require  setuptools>=61            a pyproject requirement the lock does not pin is
                                       missing or out of range (with --project, the build
                                       requirements count too)
    project  /path/to/checkout         the project is not installed editable from there

A lock pin outside a pyproject range is an input error: no install could satisfy both.

Why each line is there goes to stderr. Exit status: 0 when nothing is to be installed, 1 when
stdout lists something, 2 when an input file cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys

if sys.version_info < (3, 11):  # before tomllib's import fails with a less helpful message
    print(f"check_lock: {sys.prefix} runs Python {sys.version.split()[0]}; pyproject.toml needs 3.11 or newer: "
          "remove that venv and rerun setup.sh with PYTHON=python3.11 (or newer)", file=sys.stderr)
    sys.exit(2)

import tomllib  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

# setup.sh runs this in a fresh venv, before anything but pip is installed: pip's vendored
# copy stands in for packaging.
try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - depends on what the venv holds
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

REGENERATE = "regenerate it with `bash scripts/lock.sh`"


class InputError(Exception):
    """An input file that cannot be used; the message names the file and the fix."""


def read_lock(path: Path) -> dict[str, Requirement]:
    """The ``NAME==VERSION`` pins of a constraints file, by canonical name.

    Only exact pins are accepted: a range or an option line would make "matches the lock"
    ambiguous. Pins whose environment marker is false here are left out.
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"{path}: cannot read the lock file ({err.strerror}); {REGENERATE}") from None
    pins: dict[str, Requirement] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            req = Requirement(line)
        except InvalidRequirement:
            raise InputError(f"{where}: expected NAME==VERSION, got {line!r}; {REGENERATE}") from None
        specs = list(req.specifier)
        if req.url or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            raise InputError(f"{where}: expected NAME==VERSION, got {line!r}; {REGENERATE}")
        name = canonicalize_name(req.name)
        if name in pins:
            raise InputError(f"{where}: {req.name} is pinned twice; {REGENERATE}")
        if req.marker is None or req.marker.evaluate():
            pins[name] = req
    return pins


def read_pyproject(path: Path, extras: list[str]) -> tuple[str, list[Requirement], list[Requirement]]:
    """The project's name, its requirements (the runtime ones plus those of ``extras``) and its
    build requirements."""
    try:
        data = tomllib.loads(path.read_text())
        project = data["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"{path}: cannot read [project] ({err}); fix the file") from None
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise InputError(f"{path}: no extra named {', '.join(unknown)} in [project.optional-dependencies]; "
                         f"known: {', '.join(sorted(optional)) or 'none'}")
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += optional[extra]
    try:
        reqs = [Requirement(line) for line in lines]
        build = [Requirement(line) for line in data.get("build-system", {}).get("requires", [])]
    except InvalidRequirement as err:
        raise InputError(f"{path}: {err}; fix the requirement") from None
    return project["name"], [req for req in reqs if req.marker is None or req.marker.evaluate({"extra": ""})], \
        [req for req in build if req.marker is None or req.marker.evaluate()]


def installed_distributions() -> dict[str, metadata.Distribution]:
    """Installed distributions by canonical name; the first on sys.path wins, as for imports."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a half-removed package can leave a dist-info without metadata
            found.setdefault(canonicalize_name(name), dist)
    return found


def satisfies(version: str, req: Requirement) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def editable_from(dist: metadata.Distribution) -> str | None:
    """The folder an editable install points to (PEP 610's direct_url.json), else None."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except json.JSONDecodeError:
        return None
    if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
        return info["url"]
    return None


def _listed(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def check(lock: Path | None, pyproject: Path | None, extras: list[str], torch: str | None,
          project: bool) -> tuple[list[str], list[str]]:
    """``(to_install, reasons)``: the stdout lines and the stderr lines described above.

    A pyproject requirement that the lock also pins is reported as the lock's pin only, and a
    pin outside the requirement's range is an InputError: installing either would break the other.
    """
    dists = installed_distributions()
    have = {name: dist.version for name, dist in dists.items()}
    pins = read_lock(lock) if lock is not None else {}
    todo: list[str] = []
    why: list[str] = []
    missing: dict[str, list[str]] = {}  # where it is asked for -> names, one stderr line each

    def need(kind: str, name: str, requirement: str, wanted: str, where: str) -> None:
        todo.append(f"{kind} {requirement}")
        version = have.get(canonicalize_name(name))
        if version is None:
            missing.setdefault(where, []).append(name)
        else:
            why.append(f"{name}: installed {version}, {where} wants {wanted}")

    if torch is not None:
        req = Requirement(torch)
        version = have.get(canonicalize_name(req.name))
        if version is None or not satisfies(version, req):
            need("torch", req.name, torch, torch, "TORCH_SPEC")
    if pyproject is not None:
        name, reqs, build = read_pyproject(pyproject, extras)
        # An editable install without build isolation builds with what the venv holds, and
        # Python 3.12+ venvs come without setuptools.
        for req in reqs + (build if project else []):
            key = canonicalize_name(req.name)
            if torch is not None and key == "torch":
                continue  # the build is the installer's choice (--torch), not the range's
            spec = str(req).split(";")[0].strip()
            if key in pins:
                locked = next(iter(pins[key].specifier)).version
                if not satisfies(locked, req):
                    raise InputError(f"{lock}: pins {pins[key].name}=={locked}, outside {pyproject}'s {spec}; "
                                     f"change the range or the installed version, then {REGENERATE}")
                continue  # the lock's pin below is the stricter requirement
            version = have.get(key)
            if version is None or not satisfies(version, req):
                need("require", req.name, spec, spec, str(pyproject))
        if project:
            root = pyproject.resolve().parent
            dist = dists.get(canonicalize_name(name))
            if dist is None or editable_from(dist) != root.as_uri():
                todo.append(f"project {root}")
                why.append(f"{name}: not installed editable from {root}")
    for key, req in pins.items():
        locked = next(iter(req.specifier)).version
        version = have.get(key)
        if version is None or not satisfies(version, req):
            need("lock", req.name, f"{req.name}=={locked}", locked, str(lock))
    why += [f"not installed, wanted by {where}: {_listed(names)}" for where, names in missing.items()]
    return todo, why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--constraints", type=Path, help="lock file of NAME==VERSION pins")
    parser.add_argument("--pyproject", type=Path, help="pyproject.toml whose requirements must be met")
    parser.add_argument("--extras", default="", help="comma-separated extras of --pyproject to include")
    parser.add_argument("--torch", metavar="SPEC", help="requirement torch must meet, e.g. 'torch==2.13.0'; "
                        "given, it replaces the pyproject range for torch")
    parser.add_argument("--project", action="store_true",
                        help="also require the --pyproject project installed editable from its folder")
    parser.add_argument("--quiet", action="store_true", help="no reasons on stderr")
    args = parser.parse_args(argv)
    if args.project and args.pyproject is None:
        parser.error("--project needs --pyproject")
    try:
        if args.torch is not None:
            Requirement(args.torch)
        todo, why = check(args.constraints, args.pyproject, [e for e in args.extras.split(",") if e],
                          args.torch, args.project)
    except InvalidRequirement as err:
        print(f"check_lock: --torch {args.torch!r} is not a pip requirement ({err}); "
              "write it like 'torch==2.13.0'", file=sys.stderr)
        return 2
    except InputError as err:
        print(f"check_lock: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        for line in why:
            print(f"[check_lock] {line}", file=sys.stderr)
    for line in todo:
        print(line)
    return 1 if todo else 0


if __name__ == "__main__":
    sys.exit(main())
