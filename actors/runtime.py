"""Connecting to Ray the same way from the CLI, the server and notebooks."""

from __future__ import annotations

import logging
import os

import ray

from actors.config import AppConfig

log = logging.getLogger(__name__)

RAY_SYSTEM_CONFIG: dict[str, int] = {"maximum_gcs_destroyed_actor_cached_count": 200}
"""Ray settings a long-running voice server needs (cluster.yaml sets the same
as RAY_* variables on `ray start`). Every new session is a new actor, and the
GCS keeps a record of each dead one (100,000 by default): the 30-minute soak
saw it grow ~60 KB per session that came and went, without end. 200 keeps the
recently ended sessions visible to `ray list actors` and bounds the rest."""


def connect_ray(config: AppConfig, address: str | None = None, num_cpus: int | None = None) -> str:
    """Join a running cluster (`address`, else RAY_ADDRESS, else "auto") or,
    when none is running, start a local one. Returns what it did."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if ray.is_initialized():
        return "already connected"
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    if target != "local":
        try:
            ray.init(address=target, namespace=config.server.namespace, log_to_driver=False)
            return f"joined the Ray cluster at {target}"
        except ConnectionError:
            if address:  # asked for explicitly: do not silently start another cluster
                raise
    ray.init(namespace=config.server.namespace, include_dashboard=False, num_cpus=num_cpus,
             log_to_driver=False, _system_config=RAY_SYSTEM_CONFIG)
    return "started a local Ray instance"
