"""Sessions and pools across nodes: `python -m bench.cluster --nodes 3 --sessions 12`.

Starts a `ray.cluster_utils.Cluster` of `--nodes` nodes on this machine,
one ingress replica per node behind the head node's Serve proxy, fixed-delay
fake providers (bench/fakes.py), and streams `--sessions` native clients at
it (the pre-encoded load of bench/load.py, in its own process). Reports where
things ran while every session was live: session actors, provider pools and
ingress replicas per node, and the turn latencies.

The nodes share this machine's cores, so the latencies say nothing about a
node's capacity; that is measured on one node (bench/load.py) and the
cluster's share of it is what this shows: whether sessions and pools spread
with the nodes, and what every session still asks of cluster-wide actors.

On one machine every node's proxy would bind the same port, so only the head
has one; it stands in for the load balancer in front of a real cluster by
routing to replicas on every node (`RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0`;
with a proxy on every node, each routes to its own node's replica).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from typing import Any

from bench.load import encoded_turn, load_process, write_report
from bench.run import PORT, QUESTION, pct, prepare_node_environment, speech_fixture
from bench.soak import server_config


def actor_kind(name: str, class_name: str) -> str | None:
    if name.startswith("session-host:"):
        return "session actors"
    if name.startswith("pool:"):
        return "provider pools"
    if "ServeReplica" in class_name:
        return "ingress replicas"
    if "ProxyActor" in class_name:
        return "Serve proxies"
    if name.startswith("sessions:") or name.startswith("knowledge") or "Directory" in class_name:
        return "cluster-wide (directory, knowledge)"
    return None


def placement() -> tuple[dict[str, Counter[str]], dict[str, str]]:
    """Alive actors of interest by node; and actor id → node id. Read from
    the GCS's actor table as bench/soak.py does (the public state API needs
    the dashboard, which the bench does not start)."""
    import ray._private.state as state

    by_node: dict[str, Counter[str]] = defaultdict(Counter)
    node_of: dict[str, str] = {}
    for actor_id, a in state.actors().items():
        if a.get("State") != "ALIVE":
            continue
        node = a["Address"]["NodeID"]
        node_of[actor_id] = node
        name = a.get("Name") or ""
        kind = actor_kind(name, a.get("ActorClassName") or "")
        if kind is not None:
            by_node[node][kind] += 1
        if kind == "provider pools":  # pool:<kind>:<provider>:<node>
            made_for = name.rsplit(":", 1)[-1]
            by_node[node]["pools: " + ":".join(name.split(":")[1:3])
                          + ("" if made_for == node else f" (for node {made_for[:6]})")] += 1
    return by_node, node_of


async def live_sessions_by_node(directory: Any, node_of: dict[str, str]) -> Counter[str]:
    """Nodes of the actors hosting the directory's live sessions."""
    where: Counter[str] = Counter()
    for sid in await directory.live.remote():
        actor = await directory.locate.remote(sid)
        if actor is not None:
            where[node_of.get(actor._actor_id.hex(), "?")] += 1
    return where


async def directory_round_trip(directory: Any, calls: int = 400) -> dict[str, Any]:
    """The one cluster-wide actor every connect asks (~5 calls): its round
    trip alone and under `calls` concurrent lookups."""
    one = []
    for _ in range(50):
        t = time.perf_counter()
        await directory.lookup.remote("no-such-device")
        one.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    await asyncio.gather(*(directory.lookup.remote(f"d{i}") for i in range(calls)))
    wall = time.perf_counter() - t
    return {"round_trip_ms": pct(one), "concurrent_calls": calls, "calls_per_s": round(calls / wall)}


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from actors.ingress.auth import Authenticator
    from actors.runtime import RAY_SYSTEM_CONFIG
    from actors.session_directory import session_directory
    from serve_app import VoiceIngress

    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"  # inherited by the nodes' processes
    config = server_config("fake", opts.sessions, "voice-actors-cluster", 120.0)
    config = config.model_copy(update={"server": config.server.model_copy(update={"warm_sessions": opts.warm})})
    prepare_node_environment()  # before the nodes start: their raylets inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                            "_system_config": RAY_SYSTEM_CONFIG})
    for _ in range(opts.nodes - 1):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=config.server.namespace, log_to_driver=False)
    report: dict[str, Any] = {"nodes": opts.nodes, "sessions": opts.sessions, "turns": opts.turns,
                              "warm_sessions_per_replica": opts.warm}
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": opts.port})
        ing = config.ingress
        app = VoiceIngress.options(num_replicas=opts.nodes, max_replicas_per_node=1,
                                   max_ongoing_requests=ing.max_ongoing_requests).bind(config)
        serve.run(app, name="voice-actors", route_prefix="/")
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        print("[cluster] nodes: " + ", ".join(n[:6] for n in nodes), flush=True)
        label = {n: ("head" if i == 0 else f"node {i + 1}") for i, n in enumerate(
            sorted(nodes, key=lambda n: n != ray.get_runtime_context().get_node_id()))}
        await asyncio.sleep(opts.settle_s)  # the replicas' warm pools fill
        directory = session_directory(config)
        base = f"ws://127.0.0.1:{opts.port}"
        token = Authenticator(config.auth).issue_token("cluster-bench")
        _packets, frames, n_speech = encoded_turn(speech_fixture(QUESTION))
        print(f"[cluster] {opts.nodes} nodes up; {opts.sessions} native sessions x {opts.turns} turns", flush=True)
        recv, send = multiprocessing.get_context("spawn").Pipe(duplex=False)
        proc = multiprocessing.get_context("spawn").Process(
            target=load_process, args=(send, "native", base, token, frames, n_speech, opts.sessions, opts.turns,
                                       opts.stagger_s))
        proc.start()
        result = await asyncio.to_thread(recv.recv)
        if result.get("steady"):  # every session live, past its first turn: where is everything now
            by_node, node_of = placement()
            live = await live_sessions_by_node(directory, node_of)
            result = await asyncio.to_thread(recv.recv)
        else:
            by_node, node_of = placement()
            live = Counter()
        proc.join(10)
        report["by_node"] = {label.get(n, n[:8]): {**by_node.get(n, {}), "live sessions": live.get(n, 0)}
                             for n in sorted(nodes, key=lambda n: label[n])}
        report["e2e_ms"] = pct(result["e2e_ms"])
        report["connect_ms"] = pct(result["connect_ms"])
        report["failures"] = result["failures"]
        report["directory"] = await directory_round_trip(directory)
        report["directory_counts"] = await directory.describe.remote()
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return report


def print_report(r: dict[str, Any]) -> None:
    kinds = ["live sessions", "session actors", "provider pools", "ingress replicas", "Serve proxies",
             "cluster-wide (directory, knowledge)"]
    print("| node | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for node, counts in r["by_node"].items():
        print(f"| {node} | " + " | ".join(str(counts.get(k, 0)) for k in kinds) + " |")
    for node, counts in r["by_node"].items():
        print(f"[cluster] {node} pools: " + ", ".join(sorted(k[7:] for k in counts if k.startswith("pools: "))))
    print(f"[cluster] end of speech -> first audio p50 {r['e2e_ms']['p50']} p99 {r['e2e_ms']['p99']} ms; "
          f"connect -> hello p50 {r['connect_ms']['p50']} ms; failures {len(r['failures'])}")
    d = r["directory"]
    print(f"[cluster] session directory: round trip p50 {d['round_trip_ms']['p50']} ms, "
          f"{d['calls_per_s']} lookups/s with {d['concurrent_calls']} at once; counts {r['directory_counts']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--warm", type=int, default=2, help="warm sessions per ingress replica")
    p.add_argument("--stagger-s", type=float, default=3.0)
    p.add_argument("--settle-s", type=float, default=15.0, help="wait this long for the warm pools before the load")
    p.add_argument("--port", type=int, default=PORT + 60)
    opts = p.parse_args(argv)
    report = asyncio.run(run(opts))
    print_report(report)
    print(f"[cluster] wrote {write_report('cluster', report)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
