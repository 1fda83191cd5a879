"""Who is calling: password logins, user JWTs and xiaozhi device tokens.

Everything here is pure Python (no Ray, no web framework) so the ingress can
call it on every request and the tests can drive it with a fake clock.
Secrets come from `AuthConfig` as `SecretStr` and never appear in a log line
or in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal

import jwt

from actors.config import AuthConfig

PBKDF2_SCHEME = "pbkdf2_sha256"
DEFAULT_PBKDF2_ITERATIONS = 200_000
DEVICE_TOKEN_PREFIX = "dv1."
JWT_ALGORITHM = "HS256"

_MAX_PBKDF2_ITERATIONS = 10_000_000
"""A stored hash claiming more rounds than this is treated as malformed, so a
bad config line cannot turn every login into a minute of CPU."""


# --------------------------------------------------------------------------- passwords


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)


def hash_password(password: str, iterations: int = DEFAULT_PBKDF2_ITERATIONS) -> str:
    """Return `pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>`.

    The iteration count travels with the hash so it can be raised later
    without invalidating the hashes already in config.
    """
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    salt = secrets.token_bytes(16)
    return f"{PBKDF2_SCHEME}${iterations}${_b64(salt)}${_b64(_pbkdf2(password, salt, iterations))}"


def _parse_hash(encoded: str) -> tuple[int, bytes, bytes] | None:
    """Split a stored hash into (iterations, salt, digest); None when malformed."""
    parts = encoded.split("$") if isinstance(encoded, str) else []
    if len(parts) != 4 or parts[0] != PBKDF2_SCHEME or not parts[1].isdigit():
        return None
    iterations = int(parts[1])
    if not 1 <= iterations <= _MAX_PBKDF2_ITERATIONS:
        return None
    try:
        salt = base64.b64decode(parts[2], validate=True)
        digest = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return None
    if not salt or not digest:
        return None
    return iterations, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches `encoded`; a malformed hash never matches.

    The comparison is constant-time so the digest cannot be learned byte by
    byte from response times.
    """
    parsed = _parse_hash(encoded)
    if parsed is None:
        return False
    iterations, salt, digest = parsed
    candidate = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations,
                                    dklen=len(digest))
    return hmac.compare_digest(candidate, digest)


@lru_cache(maxsize=8)
def _dummy_hash(iterations: int) -> str:
    """A hash of a random password, checked when the user is unknown so that
    "no such user" costs as much time as "wrong password"."""
    return hash_password(secrets.token_urlsafe(16), iterations)


# --------------------------------------------------------------------------- errors and principals

_AUTH_ERRORS: dict[str, tuple[int, str]] = {
    "auth.missing_token": (401, "authentication token required"),
    "auth.bad_token": (401, "invalid authentication token"),
    "auth.expired": (401, "authentication token expired"),
    "auth.bad_credentials": (401, "invalid username or password"),
    "auth.forbidden_device": (403, "device not allowed"),
    "auth.bad_device_token": (401, "invalid device token"),
    "auth.disabled_secret": (401, "this kind of token is not enabled on the server"),
    "auth.device_token_required": (403, "this socket is for devices: present the token the OTA endpoint issued"),
    "auth.bad_device_id": (400, "Device-Id must be 1-64 characters of letters, digits and : _ . -"),
    "auth.bad_client_id": (400, "Client-Id must be 1-64 characters of letters, digits and : _ . -"),
    "auth.forbidden": (403, "this needs the admin role"),
}


class AuthError(Exception):
    """Authentication failed; `code` is stable for clients, `message` is safe to show.

    Carries both the HTTP status and the WebSocket close code so every
    transport reports the same failure the same way.
    """

    def __init__(self, code: str, message: str | None = None) -> None:
        status, default_message = _AUTH_ERRORS.get(code, (401, "authentication failed"))
        self.code = code
        self.message = message or default_message
        self.http_status = status
        self.ws_close_code = {403: 4403, 400: 4400}.get(status, 4401)
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the code when the error crosses a process boundary (pickle).
        return (type(self), (self.code, self.message))


PrincipalKind = Literal["user", "device", "anonymous"]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, as handed to the rest of the server."""

    subject: str
    kind: PrincipalKind
    roles: tuple[str, ...]
    client_id: str | None = None
    device_id: str | None = None
    expires_at: float | None = None

    @property
    def key(self) -> str:
        """`user:alice`, `device:aa:bb:...`: the one name under which this caller
        owns sessions and spends limits. Typed, so a device whose id is
        `alice` is never the user `alice`."""
        return principal_key(self.kind, self.subject)

    @property
    def is_admin(self) -> bool:
        return self.kind == "user" and "admin" in self.roles


def principal_key(kind: PrincipalKind, subject: str) -> str:
    return f"{kind}:{subject}"


_ID_PATTERN = re.compile(r"[A-Za-z0-9:_.\-]{1,64}")


def check_device_ids(device_id: str | None, client_id: str | None) -> tuple[str | None, str | None]:
    """Device-Id / Client-Id as xiaozhi firmware sends them (a MAC address and a
    UUID; browser clients make up similar ones), normalised; anything else is
    refused before it reaches a token check, a store key or a log line."""
    if device_id is not None and not _ID_PATTERN.fullmatch(device_id):
        raise AuthError("auth.bad_device_id")
    if client_id is not None and not _ID_PATTERN.fullmatch(client_id):
        raise AuthError("auth.bad_client_id")
    return (normalize_device_id(device_id) if device_id is not None else None), client_id


# --------------------------------------------------------------------------- authenticator


class Authenticator:
    """Issues and checks user JWTs and device tokens for one `AuthConfig`.

    `clock` is injectable so expiry can be tested without sleeping; every
    expiry decision goes through it (PyJWT's own clock is switched off).
    """

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock

    # ---- users

    def login(self, username: str, password: str) -> str:
        """Check a username/password from config and return a user JWT.

        Unknown user and wrong password give the same error after the same
        amount of hashing, so usernames cannot be enumerated.
        """
        user = self._config.users.get(username)
        if user is None:
            verify_password(password, _dummy_hash(self._dummy_iterations()))
            raise AuthError("auth.bad_credentials")
        if not verify_password(password, user.password_hash):
            raise AuthError("auth.bad_credentials")
        return self.issue_token(username, roles=tuple(user.roles))

    def _dummy_iterations(self) -> int:
        """Match the work factor of the configured users (their first hash)."""
        for user in self._config.users.values():
            parsed = _parse_hash(user.password_hash)
            if parsed is not None:
                return parsed[0]
        return DEFAULT_PBKDF2_ITERATIONS

    def issue_token(self, subject: str, roles: tuple[str, ...] | list[str] = ("user",),
                    ttl_s: float | None = None) -> str:
        """Sign an HS256 user token valid for `ttl_s` (default `token_ttl_s`)."""
        now = int(self._clock())
        ttl = self._config.token_ttl_s if ttl_s is None else ttl_s
        payload = {
            "iss": self._config.issuer,
            "sub": subject,
            "iat": now,
            "exp": int(now + ttl),
            "jti": secrets.token_hex(16),
            "roles": list(roles),
            "kind": "user",
        }
        return jwt.encode(payload, self._jwt_key(), algorithm=JWT_ALGORITHM)

    def verify_token(self, token: str) -> Principal:
        """Check signature, issuer, kind and expiry of a user JWT."""
        key = self._jwt_key()
        try:
            claims = jwt.decode(
                token, key, algorithms=[JWT_ALGORITHM], issuer=self._config.issuer,
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                         "require": ["iss", "sub", "iat", "exp"]})
        except jwt.InvalidTokenError:
            raise AuthError("auth.bad_token") from None
        return self._principal_from_claims(claims)

    def _principal_from_claims(self, claims: Mapping[str, Any]) -> Principal:
        subject, exp, roles = claims.get("sub"), claims.get("exp"), claims.get("roles", [])
        if (claims.get("kind") != "user" or not isinstance(subject, str) or not subject
                or isinstance(exp, bool) or not isinstance(exp, (int, float))
                or not isinstance(roles, list) or not all(isinstance(r, str) for r in roles)):
            raise AuthError("auth.bad_token")
        if exp <= self._clock():
            raise AuthError("auth.expired")
        return Principal(subject=subject, kind="user", roles=tuple(roles), expires_at=float(exp))

    def _jwt_key(self) -> str:
        if self._config.jwt_secret is None or not self._config.jwt_secret.get_secret_value():
            raise AuthError("auth.disabled_secret", "user tokens are not enabled on the server")
        return self._config.jwt_secret.get_secret_value()

    # ---- devices

    def issue_device_token(self, client_id: str, device_id: str, ttl_s: float | None = None) -> str:
        """Return `dv1.<expiry>.<hex hmac>` binding the token to this client and device.

        A compact HMAC rather than a JWT because xiaozhi firmware stores it
        verbatim and may have to pass it in a query string.
        """
        ttl = self._config.device_token_ttl_s if ttl_s is None else ttl_s
        expiry = int(self._clock() + ttl)
        return f"{DEVICE_TOKEN_PREFIX}{expiry}.{self._device_mac(client_id, device_id, expiry)}"

    def verify_device_token(self, token: str, client_id: str, device_id: str) -> Principal:
        """Check a device token against the client and device presenting it.

        The signature is checked before expiry, so a forged token never
        reveals anything beyond "invalid".
        """
        self._device_key()  # no device secret: say so before judging the token
        parsed = _parse_device_token(token)
        if parsed is None or not client_id or not device_id:
            raise AuthError("auth.bad_device_token")
        expiry, mac = parsed
        if not hmac.compare_digest(mac, self._device_mac(client_id, device_id, expiry)):
            raise AuthError("auth.bad_device_token")
        if expiry <= self._clock():
            raise AuthError("auth.expired", "device token expired")
        device_id = normalize_device_id(device_id)
        return Principal(subject=device_id, kind="device", roles=("device",),
                         client_id=client_id, device_id=device_id, expires_at=float(expiry))

    def _device_mac(self, client_id: str, device_id: str, expiry: int) -> str:
        message = f"{client_id}|{normalize_device_id(device_id)}|{expiry}".encode("utf-8")
        return hmac.new(self._device_key(), message, hashlib.sha256).hexdigest()

    def _device_key(self) -> bytes:
        secret = self._config.device_secret
        if secret is None or not secret.get_secret_value():
            raise AuthError("auth.disabled_secret", "device tokens are not enabled on the server")
        return secret.get_secret_value().encode("utf-8")

    # ---- entry point

    def authenticate(self, token: str | None, client_id: str | None = None,
                     device_id: str | None = None) -> Principal:
        """Turn whatever the caller presented into a Principal, or raise AuthError.

        With auth disabled everyone is anonymous (local development). A caller
        that names a device must hold that device's token: a user token never
        speaks for a device. Whether the device is admitted at all is the
        admission's question (actors/ingress/admission.py), asked after this.
        """
        device_id, client_id = check_device_ids(device_id, client_id)
        if not self._config.enabled:
            return Principal(subject=device_id or "anonymous", kind="anonymous", roles=(),
                             client_id=client_id, device_id=device_id)
        if not token:
            raise AuthError("auth.missing_token")
        if token.startswith(DEVICE_TOKEN_PREFIX):
            if not client_id or not device_id:
                raise AuthError("auth.bad_device_token",
                                "device token needs a client id and a device id")
            return self.verify_device_token(token, client_id, device_id)
        if device_id is not None:
            raise AuthError("auth.device_token_required")
        return replace(self.verify_token(token), client_id=client_id)

    @staticmethod
    def token_from(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """Find the token: `Authorization: Bearer` first, then the query string.

        Browsers cannot set headers on a WebSocket upgrade, so browser
        xiaozhi clients (the reference server's test page) send
        `?authorization=Bearer%20<token>`; some firmware sends `?token=` or
        `?access_token=`. All are accepted.
        """
        for name, value in headers.items():
            if name.lower() == "authorization" and isinstance(value, str):
                token = _bearer(value)
                if token:
                    return token
        value = query.get("authorization")
        if value:
            token = _bearer(value) or value.strip()
            if token:
                return token
        for name in ("token", "access_token"):
            value = query.get(name)
            if value and value.strip():
                return value.strip()
        return None


def _bearer(value: str) -> str | None:
    scheme, _, rest = value.strip().partition(" ")
    return rest.strip() or None if scheme.lower() == "bearer" else None


def normalize_device_id(device_id: str) -> str:
    """MAC addresses arrive in either case; compare them lower-cased."""
    return device_id.strip().lower()


def _parse_device_token(token: str) -> tuple[int, str] | None:
    """Split `dv1.<expiry>.<hex>` into (expiry, hex); None when malformed."""
    if not token.startswith(DEVICE_TOKEN_PREFIX):
        return None
    expiry_s, dot, mac = token[len(DEVICE_TOKEN_PREFIX):].partition(".")
    if not dot or not expiry_s.isascii() or not expiry_s.isdigit() or len(mac) != 64:
        return None
    if not all(c in "0123456789abcdef" for c in mac):
        return None
    return int(expiry_s), mac
