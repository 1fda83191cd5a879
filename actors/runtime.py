"""Connecting to Ray the same way from the CLI, the server and notebooks."""

from __future__ import annotations

import logging
import os

import ray

from actors.config import AppConfig
from actors.worker_env import prepare_this_node

log = logging.getLogger(__name__)

RAY_SYSTEM_CONFIG: dict[str, int] = {"maximum_gcs_destroyed_actor_cached_count": 200,
                                     "task_events_max_num_task_in_gcs": 10000}
"""Ray settings a long-running voice server needs (cluster.yaml sets the same
as RAY_* variables on `ray start`). The GCS keeps a record of each dead actor
(100,000 by default): the 30-minute soak saw it grow ~60 KB per session actor
that came and went; 200 keeps the recently ended ones visible to `ray list
actors` and bounds the rest. It also keeps an event per actor call for the
dashboard's task view (100,000 by default): every request to the ingress and
every directory and pool call is one, so the GCS grew with traffic until
that cap; 10,000 keeps the recent ones (the busy actors also opt out with
`enable_task_events=False`)."""


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
    prepare_this_node()
    ray.init(namespace=config.server.namespace, include_dashboard=False, num_cpus=num_cpus,
             log_to_driver=False, _system_config=RAY_SYSTEM_CONFIG)
    return "started a local Ray instance"
