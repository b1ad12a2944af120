from mhr_testkit import Service


def test_clinic_gets_token_and_reads_organizations(service: Service) -> None:
    clinic = service.register("clinic", "clinic")
    response = service.client.get("/fhir/Organization", headers=service.headers(clinic))
    assert response.status_code == 200
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert [e["resource"]["id"] for e in bundle["entry"]] == [clinic.organization_id]
