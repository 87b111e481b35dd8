"""Write constraints.txt: the exact versions the tests passed on, for every package the workbench and its test tools
pull in (torch excepted: scripts/setup_env.sh picks its build for the machine).

Run it inside .venv after upgrading a dependency and a green test run:  .venv/bin/python scripts/lock.py
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The versions the test suite last passed on (written by scripts/lock.py; do not edit by hand).
# scripts/setup_env.sh installs with these as constraints, so a new release on PyPI cannot change what the README's
# commands install. They apply to the Python the tests ran on (see the markers); on another Python, and in a user's
# own environment, pyproject.toml's looser ranges decide.
"""


def closure(roots: list[str]) -> dict[str, str]:
    """{normalised name: installed version} of the requirements `roots`, transitively."""
    found: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[list[str], tuple[str, ...]]] = [(roots, ())]
    while todo:
        requires, wanted = todo.pop()
        for raw in requires:
            req = Requirement(raw)
            env = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker and not any(req.marker.evaluate(e) for e in env):
                continue
            key = canonicalize_name(req.name)
            if (key, tuple(req.extras)) in seen:
                continue
            seen.add((key, tuple(req.extras)))
            try:
                dist = distribution(req.name)
            except PackageNotFoundError:
                continue  # an optional or platform-specific requirement not installed here
            found[key] = dist.version
            todo.append((dist.requires or [], tuple(req.extras)))
    return found


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the project's own metadata is read from pyproject.toml: an installed copy may be stale
    pins = closure(project["dependencies"] + project["optional-dependencies"]["test"])
    pins.pop("torch", None)
    # pinned for the Python they were tested on: on another, a pin may not exist (numpy 2.4 needs >= 3.11)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = [f'{name}=={pins[name]}; python_version == "{python}"' for name in sorted(pins)]
    (ROOT / "constraints.txt").write_text(HEADER + "\n".join(lines) + "\n")
    print(f"constraints.txt: {len(lines)} packages")


if __name__ == "__main__":
    main()
