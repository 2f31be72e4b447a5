"""The watermark key: a secret plus an integer seed, and the keyed random generators derived from it.

Everything random in a watermark (hyperplanes, anchors, pools, rotations) is drawn from a CPU
``torch.Generator`` seeded by HMAC-SHA256(secret, seed, purpose), so the same key and seed give a
bit-identical watermark on any machine. The secret itself is never printed: ``repr`` and
``fingerprint`` show only a short one-way digest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

import torch

SECRET_ENV_VAR = "MOEWM_SECRET_KEY"
# Used when the environment variable is unset: fine for experiments, useless as a real secret.
PUBLIC_DEMO_SECRET = "moewm-public-demo-secret"

log = logging.getLogger(__name__)


class WatermarkKey:
    """A secret and a seed; ``seed`` selects one of many keys derived from the same secret."""

    __slots__ = ("_secret", "seed")

    def __init__(self, secret: str | bytes, seed: int = 0) -> None:
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not secret:
            raise ValueError("secret_key: must be a non-empty string")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r}: must be an integer >= 0")
        self._secret = bytes(secret)
        self.seed = seed

    @classmethod
    def from_env(cls, seed: int = 0, secret: str | None = None) -> "WatermarkKey":
        """The secret from ``secret`` if given, else from $MOEWM_SECRET_KEY, else the public demo secret."""
        if not secret:
            secret = os.environ.get(SECRET_ENV_VAR)
        if not secret:
            log.warning("%s is not set: using the public demo secret (fine for research, not for deployment)", SECRET_ENV_VAR)
            secret = PUBLIC_DEMO_SECRET
        return cls(secret, seed)

    @property
    def secret_fingerprint(self) -> str:
        """Eight hex digits that identify the secret without revealing it."""
        return hashlib.sha256(b"moewm-fingerprint/" + self._secret).hexdigest()[:8]

    @property
    def fingerprint(self) -> str:
        """Identifies secret and seed together, e.g. ``3fa2b1c0/s7``."""
        return f"{self.secret_fingerprint}/s{self.seed}"

    def derive(self, purpose: str) -> bytes:
        """32 bytes for one purpose; different purposes give independent streams."""
        message = f"moewm/v1/seed={self.seed}/{purpose}".encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator seeded for ``purpose`` (draw on the CPU, then move, for device independence)."""
        seed = int.from_bytes(self.derive(purpose)[:8], "little") & ((1 << 63) - 1)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        return gen

    def __repr__(self) -> str:
        return f"WatermarkKey(fingerprint={self.fingerprint!r})"

    __str__ = __repr__

    def __reduce__(self):  # pickling (joblib / submitit launchers) must not be refused, but keep it explicit
        return (WatermarkKey, (self._secret, self.seed))
