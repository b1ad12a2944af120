"""The README, verbatim: it renders as CommonMark, and its "Try it" works as a newcomer types it.

The live test starts the server exactly as ``make run`` does (the Makefile's own
recipe, in a directory of its own) and runs every command of the "Try it" shell
blocks, in order, in one shell whose environment has no ``MHR_*`` variable at
all: nothing exported, as in a second terminal on a fresh clone. The only
change to the text is the port, so that runs in parallel do not collide.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import free_port, wait_until_ready
from markdown_it import MarkdownIt
from markdown_it.token import Token
from mhr_testkit import REPO

README = REPO / "README.md"
SHELL_INFO = {"sh", "bash", "shell", "console"}
README_PORT = "127.0.0.1:8000"


def _tokens() -> list[Token]:
    return MarkdownIt("commonmark").parse(README.read_text(encoding="utf-8"))


def _section_blocks(title: str) -> list[str]:
    """The shell code blocks under the level-2 heading ``title``, in order."""
    tokens = _tokens()
    blocks: list[str] = []
    inside = False
    for index, token in enumerate(tokens):
        if token.type == "heading_open" and token.tag == "h2":
            inside = tokens[index + 1].content.strip() == title
        elif (
            inside
            and token.type == "fence"
            and token.info.split()[:1]
            and token.info.split()[0] in SHELL_INFO
        ):
            blocks.append(token.content)
    return blocks


def _commands(block: str) -> list[str]:
    """Whole commands: continuation lines joined, comments and blank lines left out."""
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line + "\n"
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, f"a command ends in a line continuation: {pending!r}"
    return commands


def test_readme_is_commonmark_with_every_fence_closed() -> None:
    """Each fence the author wrote opens and closes where they meant it to, and every heading is one.

    A line such as ```` ``` The API docs```` does not close a fence in CommonMark: the block
    then runs on through the next sections, which render as code.
    """
    lines = README.read_text(encoding="utf-8").splitlines()
    tokens = _tokens()
    fence_lines: set[int] = set()
    for token in tokens:
        if token.type != "fence" or token.map is None:
            continue
        start, end = token.map
        closing = lines[end - 1].strip() if end - 1 > start else ""
        assert closing and set(closing) == {token.markup[0]} and len(closing) >= len(token.markup), (
            f"README.md line {start + 1}: the code fence opened there is never closed"
        )
        fence_lines.update((start, end - 1))
    for number, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            assert number in fence_lines, (
                f"README.md line {number + 1} ({line.strip()!r}) neither opens nor closes a code block"
            )
    headings = [
        tokens[index + 1].content.strip()
        for index, token in enumerate(tokens)
        if token.type == "heading_open" and token.tag == "h2"
    ]
    inside, written = False, []
    for line in lines:
        if line.startswith(("```", "~~~")):
            inside = not inside
        elif line.startswith("## ") and not inside:
            written.append(line[3:].strip())
    assert headings == written, "a '## ' heading renders as something else"
    assert "Try it" in headings


def test_try_it_has_commands() -> None:
    commands = [c for block in _section_blocks("Try it") for c in _commands(block)]
    assert len(commands) >= 10
    assert any(c.startswith("curl") for c in commands)
    assert any("mhr token" in c for c in commands)


@dataclass
class Step:
    command: str
    code: int
    output: str

    def json(self) -> Any:
        return json.loads(self.output)


def _scrubbed_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("MHR_")}


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """``make run`` in a checkout of its own (the repository's code and IG), on a free port."""
    if shutil.which("make") is None or shutil.which("curl") is None:
        pytest.skip("make and curl are what the README asks a newcomer to have; this machine lacks one")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for shared in (".venv", "fhir"):
        (checkout / shared).symlink_to(REPO / shared)
    port = free_port()
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        # -o: the virtual environment is the repository's, installed already; never rebuild it here.
        process = subprocess.Popen(
            ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-o", ".venv/.installed", "run"],
            cwd=checkout,
            env={**_scrubbed_environment(), "MHR_PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # make and the server it starts: one process group to stop
        )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", process, log_path, timeout=180, what="make run")
        yield checkout, port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _run_in_one_shell(commands: list[str], cwd: Path, port: int) -> list[Step]:
    script = []
    for number, command in enumerate(commands):
        script.append(command.replace(README_PORT, f"127.0.0.1:{port}"))
        script.append(f"printf '\\n<<step {number} exit %s>>\\n' \"$?\"")
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)],
        cwd=cwd,
        env=_scrubbed_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    pieces = re.split(r"\n?<<step (\d+) exit (\d+)>>\n", done.stdout)
    steps = [
        Step(commands[int(pieces[i + 1])], int(pieces[i + 2]), pieces[i].strip())
        for i in range(0, len(pieces) - 2, 3)
    ]
    assert len(steps) == len(commands), (
        f"the shell stopped early:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    assert "Traceback" not in done.stderr, done.stderr
    return steps


@pytest.mark.slow
def test_try_it_works_verbatim_with_nothing_exported(make_run: tuple[Path, int]) -> None:
    checkout, port = make_run
    commands = [c for block in _section_blocks("Try it") for c in _commands(block)]

    steps = _run_in_one_shell(commands, checkout, port)

    for step in steps:
        assert step.code == 0, f"{step.command}\nexited {step.code}: {step.output[-2000:]}"
        if step.command.startswith("curl"):
            assert step.output.startswith("{"), f"{step.command}\nanswered: {step.output[-2000:]!r}"
            assert step.json()["resourceType"] != "OperationOutcome", f"{step.command}\n{step.output}"

    def the(fragment: str) -> Step:
        return next(step for step in steps if fragment in step.command)

    submitted = the("--data @fhir/examples/").json()
    assert submitted["type"] == "transaction-response"
    assert all(entry["response"]["status"].startswith("201") for entry in submitted["entry"])

    found = the("Patient/_search").json()
    assert found["type"] == "searchset" and found["total"] == 1

    pulled = the('"Authorization: Bearer $ATOKEN"').json()
    assert pulled["type"] == "searchset"
    assert found["entry"][0]["resource"]["id"] in {e["resource"]["id"] for e in pulled.get("entry", [])}

    trail = the("/fhir/AuditEvent?").json()
    assert trail["type"] == "searchset" and trail["entry"]

    assert the("mhr audit verify").output.startswith("OK:")
