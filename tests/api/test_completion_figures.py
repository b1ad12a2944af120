"""Completion figures over a seeded set of follow-up tasks with known answers, on both databases.

The tasks are rows of the real follow-up table (written as service.tasks writes them) for a
migrant submitted through the API; the figures are read back through
``Measure/followup-completion/$evaluate-measure``, ``$chart`` and ``mhr figures report``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from mhr_testkit import EXAMPLES, REPO, Party, Service, load_example, submit, sync_url

from service.cli import main as cli
from service.store.tables import FollowupTask, FollowupTransfer

EVALUATE = "/fhir/Measure/followup-completion/$evaluate-measure"
CHART = "/fhir/Measure/followup-completion/$chart"
YEAR = {"periodStart": "2026", "periodEnd": "2026"}
SVG_NS = "{http://www.w3.org/2000/svg}"
ARRIVED = date(2026, 3, 1)


@dataclass
class Parties:
    clinic: Party
    other_clinic: Party
    authority_a: Party
    authority_b: Party


@dataclass
class Seeded:
    parties: Parties
    subject: str
    task_ids: list[str]


class Seeder:
    """Writes follow-up task rows (and transfers) straight into the service's database."""

    def __init__(self, database_url: str, subject: str) -> None:
        self.engine = sa.create_engine(sync_url(database_url))
        self.subject = subject
        self.ids: list[str] = []

    def task(
        self,
        owner: Party,
        requester: Party,
        *,
        arrival: date | None = ARRIVED,
        authored: datetime = datetime(2025, 12, 1, 9, 0, tzinfo=UTC),
        days: int | None = None,
        status: str | None = None,
        business_status: str | None = None,
        outcome: str = "confirmed",
        transferred_from: Party | None = None,
    ) -> str:
        task_id = str(uuid.uuid4())
        start = arrival or authored.date()
        evaluated = None if days is None else start + timedelta(days=days)
        row = {
            "id": task_id,
            "subject_id": self.subject,
            "focus_id": str(uuid.uuid4()),
            "origin_org": (transferred_from or owner).organization_id,
            "owner_org": owner.organization_id,
            "requester_org": requester.organization_id,
            "code": "tb-followup",
            "status": status or ("completed" if evaluated else "in-progress"),
            "business_status": business_status,
            "authored_at": authored,
            "arrival_date": arrival,
            "due_date": start + timedelta(days=30),
            "evaluated_on": evaluated,
            "closed_at": None if evaluated is None else datetime.combine(evaluated, datetime.min.time(), UTC),
            "outcome": outcome if evaluated else None,
            "updated_at": datetime.now(UTC),
        }
        with self.engine.begin() as conn:
            conn.execute(sa.insert(FollowupTask.__table__), [row])
            if transferred_from is not None:
                conn.execute(
                    sa.insert(FollowupTransfer.__table__),
                    [
                        {
                            "task_id": task_id,
                            "from_org": transferred_from.organization_id,
                            "to_org": owner.organization_id,
                            "at": datetime(2026, 4, 1, tzinfo=UTC),
                        }
                    ],
                )
        self.ids.append(task_id)
        return task_id


@pytest.fixture
def seeded(service: Service, database_url: str) -> Seeded:
    parties = Parties(
        clinic=service.register("clinic", "clinic"),
        other_clinic=service.register("clinic 2", "clinic"),
        authority_a=service.register("authority A", "authority", purposes=("PUBHLTH",)),
        authority_b=service.register("authority B", "authority", purposes=("PUBHLTH",)),
    )
    reply = submit(service, parties.clinic, load_example(EXAMPLES[0]))
    assert reply.status_code == 200, reply.text
    subject = next(
        e["response"]["location"].split("/")[1]
        for e in reply.json()["entry"]
        if e["response"]["location"].startswith("Patient/")
    )
    seed = Seeder(database_url, subject)
    a, b, clinic, other = parties.authority_a, parties.authority_b, parties.clinic, parties.other_clinic
    # Authority A, requested by the clinic, clock starts in 2026: 37 cases.
    for days in (-3, 10, 15, 20, 25, 30):  # within 30 days (an evaluation before arrival is day 0)
        seed.task(a, clinic, days=days)
    for days in (31, 45, 60, 75, 90):
        seed.task(a, clinic, days=days, outcome="revised" if days > 60 else "confirmed")
    for days in (91, 120, 200, 300, 365):
        seed.task(a, clinic, days=days, outcome="revised" if days > 200 else "confirmed")
    for days in (366, 380, 400, 420, 500):
        seed.task(a, clinic, days=days, outcome="revised" if days > 400 else "confirmed")
    for _ in range(6):
        seed.task(a, clinic, status="failed", business_status="lost-to-follow-up")
    for hour in (0, 6, 12, 18, 23):  # no arrival recorded: the clock starts at the authored date
        seed.task(a, clinic, arrival=None, authored=datetime(2026, 6, 1, hour, 30, tzinfo=UTC))
    # Transferred by A to B; B evaluated two of them (B's evaluations, not A's).
    for days in (40, 50, None, None, None):
        seed.task(b, clinic, days=days, transferred_from=a)
    # Not a case at all.
    seed.task(a, clinic, days=5, status="entered-in-error")
    # Outside the period: the clock start decides, not the authored date.
    seed.task(a, clinic, arrival=date(2025, 12, 31), authored=datetime(2026, 1, 2, tzinfo=UTC), days=5)
    seed.task(a, clinic, arrival=date(2027, 1, 1), days=5)
    seed.task(a, clinic, arrival=None, authored=datetime(2025, 12, 31, 23, 59, tzinfo=UTC))
    # Authority B's own cases, requested by another clinic: 3 evaluated within 30 days.
    for days in (10, 12, 14, None, None, None, None):
        seed.task(b, other, days=days)
    seed.engine.dispose()
    return Seeded(parties, subject, seed.ids)


def _headers(service: Service, party: Party) -> dict[str, str]:
    if party.role == "authority":
        return service.headers(party, purpose_of_use="PUBHLTH")
    return service.headers(party)


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """group code -> (numerator or measure-population count, or 'masked'); and the scores."""
    found: dict[str, Any] = {}
    for group in report["group"]:
        code = group["code"]["coding"][0]["code"]
        population = group["population"][-1]
        found[code] = population.get("count", "masked" if "_count" in population else None)
        score = group.get("measureScore", {})
        if "value" in score:
            found[f"{code}:score"] = score["value"]
        elif score:
            found[f"{code}:score"] = "masked"
    found["cases"] = report["group"][0]["population"][0].get("count", "masked")
    return found


def _evaluate(service: Service, party: Party, **params: str) -> Any:
    return service.client.get(EVALUATE, params=params or YEAR, headers=_headers(service, party))


def test_an_authority_gets_its_own_figures_with_known_answers(service: Service, seeded: Seeded) -> None:
    reply = _evaluate(service, seeded.parties.authority_a)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/fhir+json")
    report = reply.json()
    assert report["resourceType"] == "MeasureReport" and report["type"] == "summary"
    assert report["reporter"]["reference"] == f"Organization/{seeded.parties.authority_a.organization_id}"
    assert report["period"] == {"start": "2026-01-01", "end": "2026-12-31"}
    figures = _figures(report)
    assert figures["cases"] == 37
    assert [figures["evaluated-30d"], figures["evaluated-90d"], figures["evaluated-365d"]] == [6, 11, 16]
    assert figures["days-to-evaluation"] == 21  # evaluated at all, by A
    assert figures["days-to-evaluation:score"] == 90.0  # the median of the 21
    assert (figures["lost-to-follow-up"], figures["transferred"], figures["arrival-unknown"]) == (6, 5, 5)
    assert (figures["confirmed"], figures["revised"], figures["not-evaluated"]) == (15, 6, 16)
    assert figures["evaluated-30d:score"] == round(6 / 37, 4)


def test_a_clinic_organization_gets_its_migrants_figures_wherever_evaluated(
    service: Service, seeded: Seeded
) -> None:
    figures = _figures(_evaluate(service, seeded.parties.clinic).json())
    # A's 37 cases are all the clinic's; the two B evaluated after the transfer count here.
    assert figures["cases"] == 37
    assert [figures["evaluated-90d"], figures["evaluated-365d"], figures["days-to-evaluation"]] == [
        13,
        18,
        23,
    ]
    assert (figures["confirmed"], figures["revised"], figures["not-evaluated"]) == (17, 6, 14)
    assert figures["transferred"] == 5
    assert figures["days-to-evaluation:score"] == 75.0  # the 12th of 23: A's 21 days and B's 40 and 50


def test_small_cells_are_masked_in_the_report(service: Service, seeded: Seeded) -> None:
    figures = _figures(_evaluate(service, seeded.parties.authority_b).json())
    # B: 5 transferred in + 7 of its own; only 3 evaluated within 30 days: masked.
    assert figures["cases"] == 12
    assert figures["evaluated-30d"] == "masked" and "evaluated-30d:score" not in figures
    assert [figures["evaluated-90d"], figures["days-to-evaluation"], figures["days-to-evaluation:score"]] == [
        5,
        5,
        14.0,
    ]
    assert (figures["not-evaluated"], figures["transferred"], figures["lost-to-follow-up"]) == (7, 0, 0)


def test_the_threshold_is_a_setting(database_url: str, tmp_path: Path, seeded: Seeded) -> None:
    # A second app on the same database and keyring, told to suppress nothing.
    with Service.start(database_url, tmp_path, figures_min_cell=1) as strict_off:
        figures = _figures(_evaluate(strict_off, seeded.parties.authority_b).json())
    assert figures["evaluated-30d"] == 3


def test_another_organization_figures_are_refused(service: Service, seeded: Seeded) -> None:
    a, b = seeded.parties.authority_a, seeded.parties.authority_b
    for reporter in (f"Organization/{b.organization_id}", b.organization_id):
        reply = _evaluate(service, a, reporter=reporter, **YEAR)
        assert reply.status_code == 403, reply.text
        assert reply.json()["issue"][0]["code"] == "forbidden"
    own = _evaluate(service, a, reporter=f"Organization/{a.organization_id}", **YEAR)
    assert own.status_code == 200
    auditor = service.register("auditor", "auditor")
    for path in (EVALUATE, CHART):
        refused = service.client.get(path, params=YEAR, headers=_headers(service, auditor))
        assert refused.status_code == 403
    assert service.client.get(EVALUATE, params=YEAR).status_code == 401


@pytest.mark.parametrize(
    ("params", "expression"),
    [
        ({}, "periodStart"),
        ({"periodStart": "2026"}, "periodEnd"),
        ({"periodStart": "2026-02-30", "periodEnd": "2026"}, "periodStart"),
        ({"periodStart": "last year", "periodEnd": "2026"}, "periodStart"),
        ({"periodStart": "2026-06-01", "periodEnd": "2026-05-31"}, "periodEnd"),
        ({**YEAR, "subject": "Patient/x"}, "subject"),
        ({**YEAR, "reportType": "subject-list"}, "reportType"),
    ],
)
def test_bad_parameters_are_a_400_outcome(
    service: Service, seeded: Seeded, params: dict[str, str], expression: str
) -> None:
    for path in (EVALUATE, CHART):
        reply = service.client.get(path, params=params, headers=_headers(service, seeded.parties.authority_a))
        assert reply.status_code == 400, reply.text
        outcome = reply.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["expression"] == [expression]


def test_a_repeated_or_hostile_parameter_is_a_400(service: Service, seeded: Seeded) -> None:
    headers = _headers(service, seeded.parties.authority_a)
    for params in (
        [("periodStart", "2026"), ("periodStart", "2025"), ("periodEnd", "2026")],
        [("periodStart", "2026\x00"), ("periodEnd", "2026")],
        [("periodStart", "9" * 5000), ("periodEnd", "2026")],
    ):
        reply = service.client.get(EVALUATE, params=params, headers=headers)
        assert reply.status_code == 400, reply.text
        assert "9999" not in reply.text  # the value sent is never echoed


def test_an_unknown_measure_is_404(service: Service, seeded: Seeded) -> None:
    reply = service.client.get(
        "/fhir/Measure/other/$evaluate-measure", params=YEAR, headers=_headers(service, seeded.parties.clinic)
    )
    assert reply.status_code == 404 and reply.json()["resourceType"] == "OperationOutcome"


def test_the_chart_is_svg_without_patient_identifiers(service: Service, seeded: Seeded) -> None:
    reply = service.client.get(
        CHART,
        params=YEAR,
        headers={**_headers(service, seeded.parties.authority_a), "Accept": "image/svg+xml"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(reply.content)  # noqa: S314 - the service's own output, under test
    texts = [t.text or "" for t in root.iter(f"{SVG_NS}text")]
    assert "6 (16%)" in texts and "5 (14%)" in texts  # within 30 days; transferred
    assert any("2026-01-01 to 2026-12-31" in t for t in texts)
    body = reply.text
    for identifier in [seeded.subject, *seeded.task_ids, "N014782936"]:
        assert identifier not in body
    refused = service.client.get(
        CHART,
        params=YEAR,
        headers={**_headers(service, seeded.parties.authority_a), "Accept": "application/pdf"},
    )
    assert refused.status_code == 406


def test_figures_reads_are_audited_without_a_patient(
    service: Service, seeded: Seeded, database_url: str
) -> None:
    assert _evaluate(service, seeded.parties.authority_a).status_code == 200
    engine = sa.create_engine(sync_url(database_url))
    with engine.connect() as conn:
        entries = conn.execute(
            sa.text("SELECT id, outcome FROM audit_entries WHERE subtype = 'Measure.evaluate-measure'")
        ).all()
        refs = conn.execute(
            sa.text("SELECT value FROM audit_refs WHERE entry_id = :id"), {"id": entries[0][0]}
        ).scalars()
        values = set(refs)
    engine.dispose()
    assert [e[1] for e in entries] == ["0"]  # one entry, a success
    assert "Measure/followup-completion" in values
    assert seeded.subject not in values and not values & set(seeded.task_ids)


def test_the_command_writes_the_report_and_the_chart(
    service: Service, seeded: Seeded, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MHR_ENV", "development")
    monkeypatch.setenv("MHR_DATABASE_URL", database_url)
    monkeypatch.setenv("MHR_KEYRING_PATH", str(tmp_path / "keyring.json"))
    monkeypatch.chdir(tmp_path)
    a = seeded.parties.authority_a
    out, report = tmp_path / "chart.svg", tmp_path / "report.json"
    args = ["figures", "report", "--org", a.organization_id, "--start", "2026-01-01", "--end", "2026-12-31"]
    assert cli.main([*args, "--out", str(out), "--report", str(report)]) == 0
    figures = _figures(json.loads(report.read_text()))
    assert (figures["cases"], figures["evaluated-30d"], figures["days-to-evaluation:score"]) == (37, 6, 90.0)
    ET.fromstring(out.read_bytes())  # noqa: S314 - the command's own output, under test
    assert cli.main([*args[:3], "no such org", *args[4:]]) == 2
    assert cli.main([*args[:5], "2026-13-01", *args[6:]]) == 2


@pytest.mark.skipif(
    shutil.which("node") is None
    or not (REPO / "tools" / "ig" / "node_modules" / "@medplum" / "core").is_dir(),
    reason="the independent validator is installed by `make ig-tools`",
)
def test_served_reports_pass_the_independent_validator(
    service: Service, seeded: Seeded, tmp_path: Path
) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()
    for name, party in (("authority", seeded.parties.authority_a), ("masked", seeded.parties.authority_b)):
        (folder / f"{name}.json").write_bytes(_evaluate(service, party).content)
    done = subprocess.run(
        ["node", str(REPO / "tools" / "ig" / "validate.mjs"), "--json", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert list(json.loads(done.stdout).values()) == [[], []], done.stdout
