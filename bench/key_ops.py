"""What a key operation costs, keyring file vs a PKCS#11 token (SoftHSM2), and what the
per-request key cache saves on one migrant's ``$everything``.

    python -m bench.key_ops                  # 2000 operations per measurement, 7 rounds
    python -m bench.key_ops --ops 500 --rounds 5

In-process, on the providers themselves (no server: an operation costs microseconds,
far below what a request's timing could show). SoftHSM2 gets a token of its own in a
temporary directory (``softhsm2-util`` must be installed: ``apt-get install softhsm2``).

For each provider it prints the median over rounds of the cost of one wrap, unwrap,
blind-index HMAC, token sign, token verify (not cached) and checkpoint signature, in
microseconds. Then, for a migrant with as many stored versions as an example exam's
``$everything`` returns (18), the cost of opening them all the way today's main did
(one unwrap per resource) against the request-scoped ``OpenedKeys`` (one unwrap per
migrant), and the ratio. A measurement, not a test: results go to stdout and
``bench/results/key_ops.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from security.envelope import resource_aad
from security.keys import KeyProvider, LocalKeyring
from service.records.subject_keys import SubjectKeys

MODULES = (Path("/usr/lib/softhsm/libsofthsm2.so"), Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"))
PIN = "bench-pin-1"
EVERYTHING_ROWS = 18  # an example exam's $everything (fhir/examples/exam-adult-b1-pulmonary.json)
RESULTS = Path(__file__).parent / "results"


def _median_us(work: Callable[[], object], ops: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(ops):
            work()
        samples.append((time.perf_counter() - start) / ops * 1e6)
    return statistics.median(samples)


def _softhsm(directory: Path) -> KeyProvider:
    module = next((m for m in MODULES if m.is_file()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        raise SystemExit("SoftHSM2 is not installed: apt-get install softhsm2")
    tokens = directory / "tokens"
    tokens.mkdir()
    config = directory / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(config)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin", PIN],
        check=True,
        capture_output=True,
    )
    from security.pkcs11_keys import Pkcs11Keys

    return Pkcs11Keys.open(module, "bench", PIN, create_missing=True)


def measure(provider: KeyProvider, ops: int, rounds: int) -> dict[str, float]:
    aad = b"mhr.subject-key.v1\x00bench"
    key = os.urandom(32)
    blob = provider.wrap_key(key, aad)
    kid = provider.token_key_id()
    message = b"eyJhbGciOiJIUzI1NiJ9." + b"x" * 200  # about a token's signing input
    mac = provider.sign_token(kid, message)
    checkpoint = b"mhr.example.org/log\n12345\n" + b"A" * 44 + b"\n"
    figures = {
        "wrap_us": _median_us(lambda: provider.wrap_key(key, aad), ops, rounds),
        "unwrap_us": _median_us(lambda: provider.unwrap_key(blob, aad), ops, rounds),
        "blind_index_hmac_us": _median_us(lambda: provider.blind_index_mac(b"identifier\x00x"), ops, rounds),
        "token_sign_us": _median_us(lambda: provider.sign_token(kid, message), ops, rounds),
        "token_verify_us": _median_us(lambda: provider.verify_token(kid, message, mac), ops, rounds),
        "checkpoint_sign_us": _median_us(lambda: provider.sign_checkpoint(checkpoint), ops, max(rounds, 3)),
    }
    figures.update(_everything(provider, max(ops // 20, 20), rounds))
    return figures


def _everything(provider: KeyProvider, requests: int, rounds: int) -> dict[str, float]:
    """One migrant's $everything: open EVERYTHING_ROWS versions, per resource vs per request."""
    keys = SubjectKeys(provider)
    subject = "bench-subject"
    wrapped, cipher = keys.create(subject)
    rows = []
    for n in range(EVERYTHING_ROWS):
        aad = resource_aad("Observation", f"obs-{n}", 1, subject)
        rows.append((cipher.seal(b'{"resourceType":"Observation"}' * 20, aad), aad))

    def per_resource() -> None:  # today's main: Reader unwrapped for every row
        for blob, aad in rows:
            keys.cipher(subject, wrapped, 1).open(blob, aad)

    def per_request() -> None:  # OpenedKeys: one per request
        opened = keys.opened()
        for blob, aad in rows:
            opened.cipher(subject, wrapped, 1).open(blob, aad)

    before = _median_us(per_resource, requests, rounds)
    after = _median_us(per_request, requests, rounds)
    return {
        "everything_unwraps_before": EVERYTHING_ROWS,
        "everything_unwraps_after": 1,
        "everything_keys_us_before": before,
        "everything_keys_us_after": after,
        "everything_ratio": before / after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mhr-bench-keys-") as tmp:
        keyring = LocalKeyring.create(Path(tmp) / "keyring.json")
        results["keyring"] = measure(keyring, args.ops, args.rounds)
        hsm = _softhsm(Path(tmp))
        try:
            results["softhsm2"] = measure(hsm, args.ops, args.rounds)
        finally:
            hsm.close()
    names = list(results["keyring"])
    print(f"{'median per operation':32} {'keyring':>12} {'softhsm2':>12} {'ratio':>8}")
    for name in names:
        a, b = results["keyring"][name], results["softhsm2"][name]
        print(f"{name:32} {a:12.2f} {b:12.2f} {b / a if a else 0:8.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "key_ops.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
