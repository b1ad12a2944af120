"""A baseline to measure against: another commit of this repository, built apart with its own venv.

``make bench`` measures the working tree and a baseline in the same run (see
``bench.compare``), so that a change is judged against what it replaces on the
same machine at the same time, not against figures from another day. The
baseline is the commit named by ``BENCH_BASELINE_REF`` (any git ref, e.g.
``ec7e6f2`` or ``main~3``); by default, the previous landing: where this
branch left ``main`` (``git merge-base HEAD main``), or, when HEAD is on
``main`` itself, HEAD's first parent (the main line before the last merge).

The tree is exported with ``git archive`` (no worktree is registered, nothing
in the shared repository changes) into ``bench/.state/baseline/<commit>`` and
gets a venv installed from *its own* lock file, so that a dependency change is
measured too. A tree already built for that commit is reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.servers import REPO
from service.store.migrate import upgrade

STATE = REPO / "bench" / ".state" / "baseline"
PYTHON = os.environ.get("PYTHON", "python3.11")


@dataclass(frozen=True)
class Baseline:
    ref: str  # as asked
    commit: str  # what it resolved to (full hash)
    tree: Path  # the exported tree, with its venv in tree/.venv

    @property
    def short(self) -> str:
        return self.commit[:7]


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def default_ref() -> str:
    """The previous landing: the fork point from main, or main's previous state when on main."""
    asked = os.environ.get("BENCH_BASELINE_REF")
    if asked:
        return asked
    head = _git("rev-parse", "HEAD")
    try:
        fork = _git("merge-base", "HEAD", "main")
    except subprocess.CalledProcessError:
        fork = head
    return fork if fork != head else "HEAD^1"


def build(ref: str, log: object = print) -> Baseline:
    """The baseline tree for ``ref``, exported and installed (or reused when already built)."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    tree = STATE / commit
    stamp = tree / ".venv" / ".installed"
    if stamp.exists():
        return Baseline(ref, commit, tree)
    say = log if callable(log) else print
    say(f"baseline {ref} ({commit[:7]}): exporting and installing its own venv from its lock file")
    if tree.exists():
        shutil.rmtree(tree)  # a build cut off half-way
    tree.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive {commit} failed")
    python = tree / ".venv" / "bin" / "python"
    subprocess.run([PYTHON, "-m", "venv", str(tree / ".venv")], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    for extra in (
        ["--require-hashes", "-r", str(tree / "requirements.lock")],
        ["--no-deps", "--no-build-isolation", "-e", str(tree)],
    ):
        done = subprocess.run([*pip, *extra], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"cannot install the baseline {commit[:7]}:\n{done.stderr[-3000:]}")
    stamp.touch()
    return Baseline(ref, commit, tree)


def migrate(baseline: Baseline, database_url: str) -> None:
    """Bring a database to the baseline's own head revision, with the baseline's own migrations."""
    env = {**os.environ, "MHR_ENV": "development", "MHR_DATABASE_URL": database_url}
    subprocess.run(
        [str(baseline.tree / ".venv" / "bin" / "mhr"), "migrate"],
        cwd=baseline.tree,
        env=env,
        check=True,
        capture_output=True,
    )


def migrator(baseline: Baseline | None) -> Callable[[str], None]:
    """How the bench's kept databases are migrated: to the baseline's schema when one is
    measured (its copies must start at a revision the baseline knows), else to this tree's."""
    if baseline is None:
        return upgrade
    return lambda database_url: migrate(baseline, database_url)


if __name__ == "__main__":
    built = build(sys.argv[1] if len(sys.argv) > 1 else default_ref())
    print(f"{built.ref} = {built.commit} in {built.tree}")
