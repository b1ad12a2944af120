"""The API docs as an integrator on a network without internet access sees them."""

from __future__ import annotations

import re

from mhr_testkit import Service

from service.records.search_params import CONTROL_PARAMETERS, SEARCH_PARAMETERS

ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def test_docs_page_and_its_assets_are_served_locally(service: Service) -> None:
    page = service.client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    # Nothing the page loads comes from another host (no CDN, no protocol-relative URL).
    assert not re.search(r"(?:https?:)?//[A-Za-z0-9]", html), html
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(references) >= 3
    for url in references:
        assert url.startswith("/docs/assets/"), url
        asset = service.client.get(url)
        assert asset.status_code == 200, url
        suffix = url[url.rindex(".") :]
        assert ASSET_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 500
    bundle = service.client.get("/docs/assets/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle
    assert "url: '/openapi.json'" in html and service.client.get("/openapi.json").status_code == 200
    # The CDN-only ReDoc page is gone rather than blank offline.
    assert service.client.get("/redoc").status_code == 404
    assert service.client.get("/docs/assets/../../service/core/settings.py").status_code == 404


def _names(operation: dict[str, object]) -> set[str]:
    parameters = operation.get("parameters", [])
    assert isinstance(parameters, list)
    return {p["name"] for p in parameters}


def test_openapi_documents_each_types_search_parameters(service: Service) -> None:
    paths = service.client.get("/openapi.json").json()["paths"]
    # The generic search (what the router serves) says what every type shares.
    assert _names(paths["/fhir/{resource_type}"]["get"]) == {"resource_type"} | CONTROL_PARAMETERS
    for resource_type, accepted in SEARCH_PARAMETERS.items():
        get = paths[f"/fhir/{resource_type}"]["get"]
        assert _names(get) == set(accepted) | CONTROL_PARAMETERS, resource_type
        assert get["security"] == [{"bearer": []}] and "400" in get["responses"]
        assert all(p["in"] == "query" and p["description"] for p in get["parameters"])
        form = paths[f"/fhir/{resource_type}/_search"]["post"]["requestBody"]["content"]
        fields = form["application/x-www-form-urlencoded"]["schema"]["properties"]
        assert set(fields) == set(accepted) | CONTROL_PARAMETERS, resource_type
    date = next(p for p in paths["/fhir/Observation"]["get"]["parameters"] if p["name"] == "date")
    assert "ge" in date["description"]
    audit = _names(paths["/fhir/AuditEvent"]["get"])
    assert {"date", "agent", "entity", "patient", "action", "outcome", "type", "_sort", "_count"} <= audit
    assert {"name", "type", "_count"} <= _names(paths["/fhir/Organization"]["get"])
    # What is documented is what the router accepts: every listed name passes its parser.
    clinic = service.register("clinic", "clinic")
    headers = service.headers(clinic)
    samples = {"date": "ge2020-01-01", "_lastUpdated": "ge2020-01-01", "_count": "5", "_total": "none"}
    for resource_type, accepted in SEARCH_PARAMETERS.items():
        for name in sorted(accepted):
            value = samples.get(name, "http://loinc.org|1-8" if name != "patient" else "x")
            reply = service.client.post(f"/fhir/{resource_type}/_search", data={name: value}, headers=headers)
            assert reply.status_code == 200, (resource_type, name, reply.text)
