"""The figures count a case that went through the real follow-up loop: a Class B exam disclosed
to authority A becomes a task, A records the worksheet, and A's and the clinic's figures show
it evaluated (with the small-cell rule off, as one case is below any threshold)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from mhr_testkit import Party, Service, load_example, submit
from test_followup_tasks import B1_EXAMPLE, Loop, _in_progress, _patient_of, _report, worksheet

EVALUATE = "/fhir/Measure/followup-completion/$evaluate-measure"


def _counts(service: Service, party: Party, start: str, end: str) -> dict[str, object]:
    reply = service.client.get(
        EVALUATE,
        params={"periodStart": start, "periodEnd": end},
        headers=service.headers(party),
    )
    assert reply.status_code == 200, reply.text
    found: dict[str, object] = {}
    for group in reply.json()["group"]:
        population = group["population"][-1]
        found[group["code"]["coding"][0]["code"]] = population.get("count", "masked")
    found["cases"] = reply.json()["group"][0]["population"][0].get("count", "masked")
    return found


def test_a_case_through_the_loop_shows_in_the_figures(database_url: str, tmp_path: Path) -> None:
    today = datetime.now(UTC).date()
    start, end = (today - timedelta(days=60)).isoformat(), today.isoformat()
    with Service.start(database_url, tmp_path, figures_min_cell=1) as service:
        clinic = service.register("clinic", "clinic")
        a = service.register("authority A", "authority", purposes=("PUBHLTH",))
        b = service.register("authority B", "authority", purposes=("PUBHLTH",))
        reply = submit(service, clinic, load_example(B1_EXAMPLE))
        assert reply.status_code == 200, reply.text
        loop = Loop(service, clinic, a, b, _patient_of(reply))
        task_id = _in_progress(loop)
        # Arrived 5 days ago, evaluated yesterday (the worksheet's dates): 4 days.
        assert _report(loop, a, worksheet(loop, task_id)).status_code == 201
        for party in (a, clinic):
            figures = _counts(service, party, start, end)
            assert figures["cases"] == 1
            assert (figures["evaluated-30d"], figures["days-to-evaluation"], figures["confirmed"]) == (
                1,
                1,
                1,
            )
            assert (figures["lost-to-follow-up"], figures["not-evaluated"]) == (0, 0)
        assert _counts(service, b, start, end)["cases"] == 0
    # With the default threshold (5) the single case is not shown at all.
    with Service.start(database_url, tmp_path) as service:
        assert _counts(service, a, start, end)["cases"] == "masked"
