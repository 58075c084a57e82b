#!/usr/bin/env python3
"""Builds data-samples/scifact-mini from BEIR SciFact (../shared/datasets/scifact).

A seeded sample of 50 train and 50 test queries, every document judged for them, and other
documents drawn at random up to 600, so that retrieval on the subset is still a real (if
easier) task. Usage: python3 make_scifact_mini.py ../../shared/datasets/scifact scifact-mini
"""
import json, os, random, sys

src, dst = sys.argv[1], sys.argv[2]
rng = random.Random(2025)
queries = {q["_id"]: q for q in map(json.loads, open(os.path.join(src, "queries.jsonl")))}
corpus = [json.loads(l) for l in open(os.path.join(src, "corpus.jsonl"))]

def qrels(split):
    rows = [l.rstrip("\n").split("\t") for l in open(os.path.join(src, "qrels", split + ".tsv"))][1:]
    by_query = {}
    for q, d, s in rows:
        by_query.setdefault(q, []).append((d, s))
    return by_query

os.makedirs(os.path.join(dst, "qrels"), exist_ok=True)
keep_queries, keep_docs = [], set()
for split in ("train", "test"):
    judged = qrels(split)
    chosen = sorted(rng.sample(sorted(judged), 50), key=int)
    with open(os.path.join(dst, "qrels", split + ".tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in chosen:
            for d, s in judged[q]:
                f.write(f"{q}\t{d}\t{s}\n")
                keep_docs.add(d)
    keep_queries += chosen
others = [c["_id"] for c in corpus if c["_id"] not in keep_docs]
keep_docs |= set(rng.sample(others, 600 - len(keep_docs)))
with open(os.path.join(dst, "queries.jsonl"), "w") as f:
    for q in sorted(keep_queries, key=int):
        f.write(json.dumps(queries[q]) + "\n")
with open(os.path.join(dst, "corpus.jsonl"), "w") as f:
    for c in corpus:
        if c["_id"] in keep_docs:
            f.write(json.dumps(c) + "\n")
