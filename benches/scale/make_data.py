"""MS MARCO-shaped synthetic inputs for the scale benchmark (seeded; the text is synthetic).

corpus.tsv: N passages `pid<TAB>text` (~55 words, as MS MARCO's); queries.tsv: Q queries;
qrels.txt: one judged passage per query (TREC); graded.tsv: G graded passages whose ids name
their query and level (`qid:level:n`), as `generate` would write them.
"""
import random
import sys
from pathlib import Path

out = Path(sys.argv[1])
passages, queries, graded = (int(x) for x in sys.argv[2:5])
out.mkdir(parents=True, exist_ok=True)
rng = random.Random(42)
vocab = [f"w{i:x}" for i in range(30_000)]
# Distinct texts are drawn once and reused: the work per row is what matters, not entropy.
texts = [" ".join(rng.choices(vocab, k=rng.randint(30, 80))) for _ in range(50_000)]
with open(out / "corpus.tsv", "w") as f:
    chunk = []
    for i in range(passages):
        chunk.append(f"{i}\t{texts[i % len(texts)]}\n")
        if len(chunk) == 100_000:
            f.write("".join(chunk))
            chunk = []
    f.write("".join(chunk))
with open(out / "queries.tsv", "w") as f:
    f.write("".join(f"q{i}\t{' '.join(rng.choices(vocab, k=6))}\n" for i in range(queries)))
with open(out / "qrels.txt", "w") as f:
    f.write("".join(f"q{i} 0 {rng.randrange(passages)} 1\n" for i in range(queries)))
with open(out / "graded.tsv", "w") as f:
    per_query = graded // queries
    rows = (
        f"q{i}:{3 - j % 4}:{j}\t{texts[(i * per_query + j) % len(texts)]}\n"
        for i in range(queries)
        for j in range(per_query)
    )
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == 100_000:
            f.write("".join(chunk))
            chunk = []
    f.write("".join(chunk))
