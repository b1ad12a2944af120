"""The HTTP-stack ceiling: FastAPI answering a small JSON, on the uvicorn settings of ``mhr serve``."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, object]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational"}],
    }
