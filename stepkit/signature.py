"""Signatures of what the main flow records for later runs to trust: its cache entries and each
run's output.json. An HMAC-SHA256 of the document's canonical JSON, with a key that only main-flow
containers and the operator's tools hold (the stack's cache-key), never a step: a step that writes
or rewrites such a document cannot sign it, and the document is not trusted."""

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

KEY_ENV = "PIPELINE_CACHE_KEY"  # what the workers give main-flow containers (worker/pipeline_worker/worker.py)
KEY_FILE = Path("/secrets/cache-key")  # where the operator's tools (the cli service) read it
FIELD = "signature"


class Unsigned(ValueError):
    """A document without a valid signature of this stack's main flow."""


def key() -> bytes:
    if value := os.environ.get(KEY_ENV):
        return value.encode()
    if KEY_FILE.is_file():
        return KEY_FILE.read_text().strip().encode()
    raise Unsigned(f"no signing key: {KEY_ENV} is set only in main-flow containers (and {KEY_FILE} in the cli)")


def mac(document: dict[str, Any], secret: bytes) -> str:
    unsigned = {k: v for k, v in document.items() if k != FIELD}
    # As it reads back from JSON: the signature must hold for the stored document.
    canonical = json.dumps(json.loads(json.dumps(unsigned, default=str)), sort_keys=True, separators=(",", ":"))
    return hmac.new(secret, canonical.encode(), hashlib.sha256).hexdigest()


def signed(document: dict[str, Any], secret: bytes | None = None) -> dict[str, Any]:
    return {**document, FIELD: mac(document, secret or key())}


def verified(document: dict[str, Any], what: str, secret: bytes | None = None) -> dict[str, Any]:
    """`document` if its signature is this stack's; else Unsigned, naming `what`."""
    given = document.get(FIELD) if isinstance(document, dict) else None
    if not isinstance(given, str) or not hmac.compare_digest(given, mac(document, secret or key())):
        raise Unsigned(f"{what} is not signed by this stack's main flow: not trusted")
    return document
