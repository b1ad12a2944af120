"""The README, verbatim: it renders as CommonMark, and its demo works as a newcomer types it.

The live test starts the server exactly as ``make run`` does (the Makefile's own
recipe, in a directory of its own) and runs every command of the shell blocks of
"Try it", "Follow-up", "Subscriptions" and "Bulk export", in the README's order,
in one shell whose environment has no ``MHR_*`` variable at all: nothing
exported, as in a second terminal on a fresh clone. The only change to the text
is the ports (the server's and the demo receiver's), so that runs in parallel do
not collide.
"""

from __future__ import annotations

import contextlib
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
README_RECEIVER = "127.0.0.1:9000"
# The sections a newcomer runs one after another in the same shell, in the README's order.
DEMO_SECTIONS = ("Try it", "Follow-up", "Subscriptions", "Bulk export")


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


def _is_whole(command: str) -> bool:
    """Whether bash reads ``command`` as complete: no open quote, bracket or continuation."""
    if command.endswith("\\"):
        return False
    checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, check=False)
    return "unexpected end of file" not in checked.stderr and "unexpected EOF" not in checked.stderr


def _commands(block: str) -> list[str]:
    """Whole commands, as bash reads them: continued or multi-line quoted commands joined, and
    comment and blank lines between commands left out."""
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending = f"{pending}\n{line}" if pending else line
        if _is_whole(pending):
            commands.append(pending)
            pending = ""
    assert not pending, f"a command never ends: {pending!r}"
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
    for shared in (".venv", "fhir", "tools"):
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
    receiver = f"127.0.0.1:{free_port()}"
    script = []
    for number, command in enumerate(commands):
        script.append(command.replace(README_PORT, f"127.0.0.1:{port}").replace(README_RECEIVER, receiver))
        script.append(f"printf '\\n<<step {number} exit %s>>\\n' \"$?\"")
    shell = subprocess.Popen(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)],
        cwd=cwd,
        env=_scrubbed_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the shell and the receiver it starts in the background
    )
    try:
        stdout, stderr = shell.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGTERM)  # the receiver outlives the shell otherwise
        if shell.poll() is None:
            shell.kill()
            shell.communicate()
    pieces = re.split(r"\n?<<step (\d+) exit (\d+)>>\n", stdout)
    steps = [
        Step(commands[int(pieces[i + 1])], int(pieces[i + 2]), pieces[i].strip())
        for i in range(0, len(pieces) - 2, 3)
    ]
    assert len(steps) == len(commands), f"the shell stopped early:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr
    return steps


def _json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_demo_works_verbatim_with_nothing_exported(make_run: tuple[Path, int]) -> None:
    """Try it, Follow-up, Subscriptions and Bulk export, as written, one after another."""
    checkout, port = make_run
    sections = {
        title: [c for block in _section_blocks(title) for c in _commands(block)] for title in DEMO_SECTIONS
    }
    commands = [c for title in DEMO_SECTIONS for c in sections[title]]

    steps = _run_in_one_shell(commands, checkout, port)

    received_log = (checkout / "var" / "hook.log").read_text(encoding="utf-8")
    for step in steps:
        assert step.code == 0, f"{step.command}\nexited {step.code}: {step.output[-2000:]}\n{received_log}"
    try_it = steps[: len(sections["Try it"])]
    for step in try_it:
        if step.command.startswith("curl"):
            assert step.output.startswith("{"), f"{step.command}\nanswered: {step.output[-2000:]!r}"
            assert step.json()["resourceType"] != "OperationOutcome", f"{step.command}\n{step.output}"

    def the(fragment: str, among: list[Step] = steps) -> Step:
        return next(step for step in among if fragment in step.command)

    def all_of(fragment: str) -> list[Step]:
        return [step for step in steps if fragment in step.command]

    # Try it: the clinic submits, authority A is notified with ids only and fetches the record.
    submitted = the("--data @fhir/examples/").json()
    assert submitted["type"] == "transaction-response"
    assert all(entry["response"]["status"].startswith("201") for entry in submitted["entry"])
    found = the("Patient/_search").json()
    assert found["type"] == "searchset" and found["total"] == 1
    patient_id = found["entry"][0]["resource"]["id"]

    received = the("cat var/hook.log").output.splitlines()
    assert received[1] == "handshake", received
    notified = [line for line in received if line.startswith("event-notification ")]
    assert any(f"/fhir/Patient/{patient_id}/_history/1" in line for line in notified), received
    # One event per resource of the exam that the consent lets A see (not every one), in order.
    locations = {entry["response"]["location"] for entry in submitted["entry"]}
    focuses = [line.split()[2].split("/fhir/", 1)[1] for line in notified]
    assert set(focuses) < locations and len(focuses) == len(set(focuses))
    assert [int(line.split()[1]) for line in notified] == list(range(1, len(notified) + 1))
    fetched = the("grep -o").json()
    assert fetched["resourceType"] == "Patient" and fetched["id"] == patient_id

    pulled = the("Patient?_lastUpdated=").json()
    assert pulled["type"] == "searchset"
    assert patient_id in {e["resource"]["id"] for e in pulled.get("entry", [])}
    trail = the("/fhir/AuditEvent?").json()
    assert trail["type"] == "searchset" and trail["entry"]
    assert the("mhr audit verify").output.startswith("OK:")

    # Follow-up: the consent makes a task; the authority moves it; a transfer waits for consent.
    accepted, started, refused = (step.json() for step in all_of("progress '"))
    assert accepted["status"] == "accepted" and started["status"] == "in-progress"
    assert refused["resourceType"] == "OperationOutcome"
    worksheet = the("/fhir/QuestionnaireResponse").json()
    assert worksheet["resourceType"] == "QuestionnaireResponse", worksheet
    completed = the("Task?status=completed").json()
    assert [e["resource"]["status"] for e in completed["entry"]] == ["completed"]
    first_transfer, second_transfer = (step.json() for step in all_of("transfer   #"))
    assert first_transfer["resourceType"] == "OperationOutcome"
    transferred = next(p["resource"] for p in second_transfer["parameter"] if p["name"] == "return")
    assert transferred["owner"]["reference"].endswith("Organization/authority-b")
    worklist_b = the("Task?owner=Organization/authority-b").json()
    assert [e["resource"]["id"] for e in worklist_b["entry"]] == [transferred["id"]]
    assert the("mhr tasks overdue").output.startswith("1 task(s) raised")
    overdue_events = the("$OSUB/\\$events").json()
    assert f"Task/{transferred['id']}" in json.dumps(overdue_events)
    assert (checkout / "chart.svg").read_text(encoding="utf-8").lstrip().startswith("<")

    # Subscriptions: A's subscription is active, and $events gives back what was pushed.
    status = the("$SUB/\\$status").json()
    parameters = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
    assert parameters["status"]["valueCode"] == "active"
    missed = the("$SUB/\\$events").json()
    assert f"/fhir/Patient/{patient_id}/_history/1" in json.dumps(missed)

    # Bulk export: A's Patients and Observations, the consented migrant's among them, then removed.
    bulk = steps[-len(sections["Bulk export"]) :]
    exported = _json_lines(the("output", bulk).output)
    assert exported and {r["resourceType"] for r in exported} <= {"Patient", "Observation"}
    assert patient_id in json.dumps(exported)  # the Patient file, or Observations of that Patient
    assert the("-X DELETE", bulk).json()["issue"][0]["severity"] == "information"
    groups = the("/fhir/Group", bulk).json()
    assert groups["type"] == "searchset" and groups["entry"]
