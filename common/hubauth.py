"""Who may use the model hub: request signatures with SuperNode keys.

With SuperNode authentication on, the SuperLink admits only SuperNodes whose public key
the operator registered; the hub admits the same keys. A client signs
``mos-hub|<unix time>|<method>`` with its private key (ECDSA, SHA-256) and sends its public
key, the time and the signature as gRPC metadata. The hub checks that the key is
registered, the time is within ``MAX_SKEW_S`` of its own and the signature verifies.
Keys are read with ``cryptography`` (OpenSSH or PEM, as Flower's docs make them).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

KEY_HEADER = "mos-hub-key"
TIME_HEADER = "mos-hub-time"
SIGNATURE_HEADER = "mos-hub-signature"
MAX_SKEW_S = 300.0


class HubAuthError(ValueError):
    """A key cannot be used, or a request is not signed by a registered key."""


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    data = Path(path).read_bytes()
    try:
        key = (
            serialization.load_ssh_public_key(data)
            if data.startswith(b"ecdsa-")
            else serialization.load_pem_public_key(data)
        )
    except ValueError as err:
        raise HubAuthError(f"{path}: not an OpenSSH or PEM public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise HubAuthError(f"{path}: SuperNode keys are elliptic-curve (ECDSA) keys")
    return key


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = Path(path).read_bytes()
    try:
        key = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH PRIVATE KEY" in data
            else serialization.load_pem_private_key(data, password=None)
        )
    except (ValueError, TypeError) as err:
        raise HubAuthError(
            f"{path}: not an unencrypted OpenSSH or PEM private key ({err})"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HubAuthError(f"{path}: SuperNode keys are elliptic-curve (ECDSA) keys")
    return key


def public_key_text(key: ec.EllipticCurvePublicKey) -> str:
    """The key in OpenSSH form, one line (how it travels in metadata)."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def _message(stamp: str, method: str) -> bytes:
    return f"mos-hub|{stamp}|{method}".encode()


def sign_request(
    key: ec.EllipticCurvePrivateKey, method: str, now: float | None = None
) -> list[tuple[str, str]]:
    """The metadata that authenticates one call of ``method`` (e.g. ``/mos.hub.v1.ModelHub/Download``)."""
    stamp = f"{time.time() if now is None else now:.3f}"
    signature = key.sign(_message(stamp, method), ec.ECDSA(hashes.SHA256()))
    return [
        (KEY_HEADER, public_key_text(key.public_key())),
        (TIME_HEADER, stamp),
        (SIGNATURE_HEADER, base64.b64encode(signature).decode()),
    ]


class KeyRing:
    """The registered public keys; ``check`` raises ``HubAuthError`` with the reason."""

    def __init__(self, keys: list[ec.EllipticCurvePublicKey]) -> None:
        self._keys = {public_key_text(k): k for k in keys}

    @classmethod
    def from_files(cls, paths: list[Path]) -> KeyRing:
        return cls([load_public_key(p) for p in paths])

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, metadata: dict[str, str], method: str, now: float | None = None) -> str:
        """The caller's key text if the request is signed by a registered key."""
        key_text = metadata.get(KEY_HEADER, "")
        key = self._keys.get(key_text.strip())
        if key is None:
            raise HubAuthError("the request is not signed by a registered SuperNode key")
        try:
            stamp = metadata[TIME_HEADER]
            skew = abs((time.time() if now is None else now) - float(stamp))
            signature = base64.b64decode(metadata[SIGNATURE_HEADER], validate=True)
        except (KeyError, ValueError) as err:
            raise HubAuthError(f"malformed authentication metadata ({err})") from err
        if skew > MAX_SKEW_S:
            raise HubAuthError(f"the request's time is {skew:.0f} s off the server's")
        try:
            key.verify(signature, _message(stamp, method), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as err:
            raise HubAuthError("the request's signature does not verify") from err
        return key_text
