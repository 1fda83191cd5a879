"""Device admission: who may become a xiaozhi device (docs/security.md).

A device token proves only that the OTA endpoint issued it, so the OTA
endpoint must not issue one to just anyone. Modes (`auth.device_admission`):

- `activation`: a device on `auth.device_allowlist` is admitted at once; any
  other gets an activation code and no token until its owner confirms the code.
- `allowlist`: only the listed devices; the rest are refused.
- `open`: every device is admitted (a closed lab network only).
- `auto` (default): `open` for requests from this machine's loopback address
  (local development, the CLI), `activation` for everyone else, so a server
  reachable on a network never hands out devices by default.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from actors.config import AuthConfig
from actors.ingress.auth import AuthError, normalize_device_id
from actors.ingress.devices import DeviceRegistry, PendingActivation
from actors.ingress.limits import LimitError


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OtaDecision:
    admitted: bool
    activation: PendingActivation | None = None


class DeviceAdmission:
    def __init__(self, config: AuthConfig, registry: DeviceRegistry) -> None:
        self._config = config
        self._registry = registry
        self._allow = frozenset(normalize_device_id(d) for d in config.device_allowlist or ())

    @property
    def registry(self) -> DeviceRegistry:
        return self._registry

    def mode_for(self, client_host: str | None) -> str:
        mode = self._config.device_admission
        if mode == "auto":
            return "open" if is_loopback(client_host) else "activation"
        return mode

    def on_ota(self, device_id: str, client_id: str, client_host: str | None) -> OtaDecision:
        """What the OTA endpoint may tell this device: admitted (hand it a
        token), waiting (its activation code), or refused (AuthError)."""
        mode = self.mode_for(client_host)
        if device_id in self._allow:
            self._registry.admit(device_id, client_id, None, "allowlist")
            return OtaDecision(True)
        if mode == "open":
            self._registry.admit(device_id, client_id, None, "open" if self._config.device_admission == "open"
                                 else "loopback")
            return OtaDecision(True)
        if mode == "allowlist":
            raise AuthError("auth.forbidden_device")
        if self._registry.is_admitted(device_id):
            return OtaDecision(True)
        pending = self._registry.pending(device_id, client_id, self._config.activation_ttl_s,
                                         self._config.max_pending_activations)
        if pending is None:
            raise LimitError("limit.pending_activations")
        return OtaDecision(False, pending)

    def check_socket(self, device_id: str) -> str | None:
        """A device may open a socket only while it is admitted: revoking a
        device shuts it out even though its token has not expired. → the
        persona its owner chose for it (None: the default), read in the same
        query."""
        admitted, persona = self._registry.lookup(device_id)
        if not admitted and self._config.device_admission != "open" and device_id not in self._allow:
            raise AuthError("auth.forbidden_device")
        return persona
