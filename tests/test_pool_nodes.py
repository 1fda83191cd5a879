"""Provider pools scale with the cluster (DESIGN §3): one pool per node, and a
caller is served by the pool on its own node.

Runs a two-node `ray.cluster_utils.Cluster` in a subprocess: the rest of the
suite shares the one in-process Ray that conftest starts, and a process can
only `ray.init` once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = r'''
import asyncio, json, os, sys
import ray
from ray.cluster_utils import Cluster
from actors.config import load_config
from actors.pools import pool_handles

NAMESPACE = "voice-actors-pool-nodes-test"
config = load_config(env={
    "VOICE_ACTORS__SERVER__NAMESPACE": NAMESPACE,
    "VOICE_ACTORS__TTS__PROVIDER": "local-espeak",
    "VOICE_ACTORS__POOLS__TTS__NUM_CPUS": sys.argv[1],  # "0": the default; "0.25": fits a 1-CPU node
})

@ray.remote(num_cpus=0)
def speak(config):
    """Runs where its custom resource puts it; speaks through whichever pool
    tts_provider picks for this node."""
    from actors.pools import tts_provider
    seg = asyncio.run(tts_provider("local-espeak", config).synthesize("hello"))
    from actors.sessions import new_session_actor
    session = new_session_actor(config)  # started here: runs here
    ray.get(session.hosting.remote())  # up
    import ray._private.state as state
    session_node = state.actors()[session._actor_id.hex()]["Address"]["NodeID"]
    ray.kill(session)
    return {"node": ray.get_runtime_context().get_node_id(), "bytes": len(seg.pcm16), "session_node": session_node}

cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    callers = ray.get([speak.options(resources={r: 1}).remote(config) for r in ("node_a", "node_b")], timeout=60)
    pools = pool_handles("tts", "local-espeak", config)
    stats = dict(zip(pools, ray.get([h.stats.remote() for h in pools.values()], timeout=30)))
    print("RESULT " + json.dumps({"callers": callers, "pools": stats}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
'''


@pytest.mark.parametrize("num_cpus", ["0", "0.25"])  # no reservation (hard affinity), a reservation (soft)
def test_each_node_is_served_by_its_own_pool(num_cpus: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SCENARIO, num_cpus], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    took = time.monotonic() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"scenario failed ({done.returncode}):\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))

    callers, pools = result["callers"], result["pools"]
    caller_nodes = {c["node"] for c in callers}
    assert len(caller_nodes) == 2, callers  # the custom resources put the callers on different nodes
    assert all(c["bytes"] > 0 for c in callers)
    assert all(c["session_node"] == c["node"] for c in callers), callers  # a session runs where it was started
    # One pool per caller node, each named for and running on that node, and each served
    # exactly its own node's one call: no caller crossed to the other node's pool.
    assert set(pools) == caller_nodes, pools
    for node_id, stats in pools.items():
        assert stats["node_id"] == node_id, (node_id, stats)
        assert stats["calls"] == 1 and stats["failures"] == 0, stats
    assert took < 90, f"two-node scenario took {took:.0f} s"
