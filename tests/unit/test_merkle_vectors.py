"""Third-party RFC 6962/9162 proof vectors (transparency-dev/merkle testdata).

The vectors stay in the sibling ``shared/`` folder under their own licence
(Apache-2.0); they are never copied into this repository. A clone without
that folder skips this module instead of failing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from security.merkle import ProofError, verify_consistency, verify_inclusion

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "merkle"

if not VECTORS.is_dir():
    pytest.skip(
        "../shared/testdata/merkle (third-party vectors, Apache-2.0) is not present beside this clone",
        allow_module_level=True,
    )

# The upstream set holds 98 inclusion and 98 consistency vectors; a much
# smaller count means the glob or the folder layout broke, not that all passed.
MIN_INCLUSION = 90
MIN_CONSISTENCY = 90


def _files(kind: str) -> list[Path]:
    return sorted((VECTORS / kind).rglob("*.json"))


def _b64(value: str | None) -> bytes:
    # Go marshals a nil slice as null; the generator uses it for "no bytes".
    return base64.b64decode(value or "", validate=True)


def _proof(vector: dict[str, Any]) -> list[bytes]:
    return [_b64(item) for item in vector["proof"] or []]


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


INCLUSION = _files("inclusion")
CONSISTENCY = _files("consistency")


def _id(path: Path) -> str:
    return str(path.relative_to(VECTORS))


def test_vector_counts() -> None:
    assert len(INCLUSION) >= MIN_INCLUSION
    assert len(CONSISTENCY) >= MIN_CONSISTENCY
    # The edge-case folders must be among them: they carry the tricky rules.
    names = {_id(p).split("/")[1] for p in INCLUSION}
    assert {"additional", "single-entry"} <= names
    assert any(_id(p).startswith("consistency/additional/") for p in CONSISTENCY)
    # Both outcomes are exercised.
    outcomes = {_load(p)["wantErr"] for p in INCLUSION + CONSISTENCY}
    assert outcomes == {True, False}


@pytest.mark.parametrize("path", INCLUSION, ids=_id)
def test_inclusion_vector(path: Path) -> None:
    vector = _load(path)
    args = (
        vector["leafIdx"],
        vector["treeSize"],
        _b64(vector["leafHash"]),
        _proof(vector),
        _b64(vector["root"]),
    )
    if vector["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", CONSISTENCY, ids=_id)
def test_consistency_vector(path: Path) -> None:
    vector = _load(path)
    args = (
        vector["size1"],
        vector["size2"],
        _proof(vector),
        _b64(vector["root1"]),
        _b64(vector["root2"]),
    )
    if vector["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)
