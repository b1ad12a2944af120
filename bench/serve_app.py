"""Serve an ASGI app with the uvicorn settings of ``mhr serve``.

    python -m bench.serve_app MODULE:APP PORT [WORKERS]


Runs in the project venv (the HTTP-stack baseline) and in the peer's venv
(fhirstarter), so it imports nothing but uvicorn.
"""

from __future__ import annotations

import sys

import uvicorn

# Kept in step with bench.servers.UVICORN_SETTINGS and service/cli/main.py (cmd_serve).
SETTINGS = {
    "log_config": None,
    "proxy_headers": True,
    "server_header": False,
    "timeout_keep_alive": 5,
    "timeout_graceful_shutdown": 20,
}

if __name__ == "__main__":
    app, port = sys.argv[1], int(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    uvicorn.run(app, host="127.0.0.1", port=port, workers=workers, **SETTINGS)  # type: ignore[arg-type]
