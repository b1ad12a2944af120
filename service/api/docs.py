"""The API docs page (Swagger UI), served with its assets from an installed package.

FastAPI's default page loads Swagger UI from a CDN, so on a clinic's or a health department's
network without internet access /docs is blank. Here the script, stylesheet and icon come from
the `swagger-ui-bundle-v2` package (Swagger UI 5, which reads OpenAPI 3.1) under /docs/assets.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
ASSETS_DIR = Path(str(swagger_ui_bundle.swagger_ui_path))


def install_docs(app: FastAPI, *, title: str) -> None:
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="swagger-ui-assets")

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
            oauth2_redirect_url=None,  # bearer tokens are pasted in; no OAuth flow runs in the page
        )

    app.add_api_route(DOCS_URL, docs, methods=["GET"], include_in_schema=False)
