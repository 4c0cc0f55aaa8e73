"""`make help` lists every target of Makefile and mk/*.mk, each with a description.

The targets come from make's own database (`make -pq`), so a rule written in any form
counts, and a target without a `## description` on its rule line fails here.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str) -> str:
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args],
                          capture_output=True, text=True, timeout=60, check=False).stdout


def defined_targets() -> set[str]:
    """Every target with a rule in the makefiles: make's database without its built-in
    rules, minus the entries it marks "Not a target" (the makefiles themselves, files
    it only looked at) and special targets such as .PHONY."""
    targets, not_a_target = set(), False
    for line in make("-pqRr").splitlines():
        if line == "# Not a target:":
            not_a_target = True
            continue
        match = re.match(r"([A-Za-z0-9_][A-Za-z0-9_./-]*):(?!=)", line)
        if match and not not_a_target:
            targets.add(match[1])
        if not line.startswith("#"):
            not_a_target = False
    return targets


def listed_targets() -> dict[str, str]:
    listed = {}
    for line in make("help").splitlines()[1:]:
        target, _, description = line.strip().partition(" ")
        listed[target] = description.strip()
    return listed


def test_every_target_is_listed_with_a_description():
    targets = defined_targets()
    assert {"help", "test", "image", "deps", "fuzz"} <= targets  # the parse found them
    listed = listed_targets()
    assert sorted(targets - listed.keys()) == []
    assert sorted(listed.keys() - targets) == []
    assert [target for target, description in listed.items() if not description] == []


def test_help_is_the_default_goal():
    assert make() == make("help")
