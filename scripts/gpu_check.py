#!/usr/bin/env python3
"""The GPU checks: synthrank (a `--features cuda` binary) against the reference numbers and
against PyTorch / sentence-transformers on the same GPU. Run by scripts/gpu-check.sh on a GPU
machine (PyTorch, transformers, sentence-transformers; no Rust, no network); `--device cpu
--quick` runs the same plumbing on a CPU machine at toy sizes.

Checks, each printed as one JSON line and summed up in a table at the end:
  golden     ../shared/golden/train_steps.json (five AdamW steps of all-MiniLM-L6-v2, f32, no
             dropout) through the real pipeline (load, assemble, tokenize, train, embed): losses
             within 1e-3 relative, the probe embedding after training within 1e-3.
  parity     MiniLM embeddings of SciFact documents (candle; ONNX Runtime when the machine has
             onnxruntime-gpu) against sentence-transformers on the same device: max |diff| <= 1e-4.
  train      one training step of a BERT-base-sized encoder (random weights from its config; 64
             queries x 4 passages, 64/256 tokens, Wasserstein, AdamW), median step, against
             PyTorch eager at the same precision (f32, TF32 off; bf16 autocast). Bar: <= 1.5x.
  embed      documents/s at 256 tokens against sentence-transformers (f32; f16). Bar: >= 1.0x.
"""
import argparse, json, os, random, shutil, statistics, subprocess, sys, time
from pathlib import Path

RESULTS = []


def report(check, **fields):
    """Prints a result and rewrites $OUT/gpu-check.json, so a run cut short keeps what it had."""
    row = {"check": check, **fields}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu-check.json").write_text(json.dumps(RESULTS, indent=1))


class Synthrank:
    """Runs pipelines with the binary under test, each in its own work directory."""

    def __init__(self, binary, root):
        self.binary, self.root = binary, Path(root)

    def run(self, name, spec):
        work = self.root / name
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        (work / "spec.yaml").write_text(spec)
        log = work / "run.log"
        with open(log, "w") as out:
            code = subprocess.run([self.binary, "run", str(work / "spec.yaml"), "--workdir",
                                   str(work / "work")], stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            sys.exit(f"{name}: synthrank exited {code}:\n" + log.read_text()[-4000:])
        return work

    def sql(self, work, query):
        out = subprocess.run([self.binary, "sql", str(work / "spec.yaml"), query, "--workdir",
                              str(work / "work"), "--format", "json"],
                             check=True, capture_output=True, text=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def vectors(self, work, table):
        rows = self.sql(work, f"SELECT id, vector FROM {table}")
        return {r["id"]: r["vector"] for r in rows}

    def stats(self, work, stage):
        return json.loads((work / "work" / stage / "_manifest.json").read_text())["stats"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_qrels(path, triples):
    with open(path, "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d, s in triples:
            f.write(f"{q}\t{d}\t{s}\n")


def lists_pipeline(data, model, train_config, extra=""):
    """load -> assemble (graded qrels, highest label first) -> tokenize -> train."""
    return f"""name: gpu-check
stages:
  - {{name: queries, kind: load_queries, config: {{path: {data}/queries.jsonl}}}}
  - {{name: corpus, kind: load_corpus, config: {{path: {data}/corpus.jsonl}}}}
  - {{name: qrels, kind: load_qrels, config: {{path: {data}/qrels.tsv, format: beir}}}}
  - name: lists
    kind: assemble
    inputs: {{qrels: qrels, corpus: corpus}}
    config: {{group_size: 4, selection: top, sources: [{{input: qrels}}]}}
  - name: tokens
    kind: tokenize
    inputs: {{groups: lists, queries: queries}}
    config: {{model: {model}, max_query_len: 64, max_passage_len: {train_config.pop('max_passage_len')}}}
  - name: train
    kind: train
    inputs: [tokens]
    config: {json.dumps({'model': str(model), **train_config})}
{extra}"""


def check_golden(sr, args):
    golden = json.loads((args.golden / "train_steps.json").read_text())
    data = sr.root / "golden-data"
    data.mkdir(parents=True, exist_ok=True)
    queries, corpus, qrels = {}, {}, []
    for item in golden["batch"]:
        queries[item["query_id"]] = item["query"]
        for pid, text, label in zip(item["passage_ids"], item["passages"], item["labels"]):
            corpus[pid] = text
            qrels.append((item["query_id"], pid, int(label)))
    write_jsonl(data / "queries.jsonl", [{"_id": k, "text": v} for k, v in queries.items()])
    write_jsonl(data / "corpus.jsonl", [{"_id": k, "title": "", "text": v} for k, v in corpus.items()])
    write_qrels(data / "qrels.tsv", qrels)
    probe = golden["wasserstein"]["probe_text"]
    write_jsonl(data / "probe.jsonl", [{"_id": "probe", "title": "", "text": probe}])
    steps = len(golden["wasserstein"]["losses"])
    train = {"max_passage_len": golden["max_length"], "loss": "wasserstein", "temperature": 1.0,
             "batch_size": golden["B"], "epochs": steps, "lr": golden["lr"], "warmup_steps": 0,
             "decay": "constant", "dropout": False, "pooling": "mean", "normalize": False,
             "device": args.device}
    probe_stages = f"""  - {{name: probe, kind: load_corpus, config: {{path: {data}/probe.jsonl}}}}
  - name: probe_vector
    kind: embed
    inputs: {{corpus: probe, model: train.model}}
    config: {{backend: candle, pooling: mean, normalize: false, max_length: {golden['max_length']}, device: {args.device}}}
"""
    work = sr.run("golden", lists_pipeline(data, args.model, train, probe_stages))
    log = sr.sql(work, "SELECT step, loss FROM train.train_log ORDER BY step")
    want = golden["wasserstein"]["losses"]
    got = [r["loss"] for r in log]
    rel = max(abs(g - w) / abs(w) for g, w in zip(got, want)) if len(got) == len(want) else float("inf")
    vector = sr.vectors(work, "probe_vector")["probe"]
    expected = golden["wasserstein"]["probe_embedding_after"]
    diff = max(abs(a - b) for a, b in zip(vector, expected))
    report("golden", device=sr.stats(work, "train")["device"], steps=len(got), losses=got,
           worst_loss_rel=rel, probe_max_diff=diff, ok=rel <= 1e-3 and diff <= 1e-3)


def scifact_slice(args, n):
    docs = [json.loads(l) for l in open(args.data / "corpus.jsonl")][:n]
    queries = [json.loads(l) for l in open(args.data / "queries.jsonl")]
    return docs, queries


def sentence_transformers_encode(model_dir, texts, device, batch, half=False):
    """sentence-transformers' own encode (the rate users get), vectors as lists."""
    import torch
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(model_dir), device=device)
    model.max_seq_length = 256
    if half:
        model = model.half()
    model.encode(texts[:batch], batch_size=batch)  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.encode(texts, batch_size=batch, convert_to_numpy=True)
    seconds = time.perf_counter() - start
    return out, len(texts) / seconds


def onnxruntime_gpu():
    """libonnxruntime.so of an installed onnxruntime-gpu with the CUDA provider, else None."""
    try:
        import onnxruntime
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return None
    capi = Path(onnxruntime.__file__).parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"))
    return libs[0] if libs else None


def embed_pipeline(data, model, backends, device, batch):
    stages = "".join(f"""  - name: {name}
    kind: embed
    inputs: {{corpus: corpus}}
    config: {json.dumps({'model': str(model), 'max_length': 256, 'max_batch': batch,
                         'batch_tokens': batch * 256, 'device': device, **config})}
""" for name, config in backends.items())
    return f"""name: gpu-check-embed
stages:
  - {{name: corpus, kind: load_corpus, config: {{path: {data}/corpus.jsonl}}}}
{stages}"""


def check_embeddings(sr, args):
    docs, _ = scifact_slice(args, args.docs)
    data = sr.root / "embed-data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "corpus.jsonl", docs)
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
    backends = {"candle_f32": {"backend": "candle"}, "candle_f16": {"backend": "candle", "precision": "f16"}}
    library = onnxruntime_gpu() if args.device != "cpu" else None
    if library:
        backends["onnx_f32"] = {"backend": "onnx", "onnxruntime": str(library)}
    else:
        report("parity", backend="onnx", skipped="no onnxruntime-gpu with the CUDA provider on this machine")
    work = sr.run("embed", embed_pipeline(data, args.model, backends, args.device, args.batch))
    torch_device = "cuda" if args.device != "cpu" else "cpu"
    reference, st_rate = sentence_transformers_encode(args.model, texts, torch_device, args.batch)
    _, st_half_rate = sentence_transformers_encode(args.model, texts, torch_device, args.batch, half=True) \
        if torch_device == "cuda" else (None, None)
    ids = [d["_id"] for d in docs]
    for name in backends:
        vectors = sr.vectors(work, name)
        diff = float(max(abs(a - b) for i, want in zip(ids, reference) for a, b in zip(vectors[i], want)))
        stats = sr.stats(work, name)
        tolerance = 1e-4 if name.endswith("f32") else 2e-3
        report("parity", backend=name, device=stats["device"], max_diff=diff, tolerance=tolerance,
               ok=diff <= tolerance)
        peer = st_half_rate if name.endswith("f16") and st_half_rate else st_rate
        report("embed", backend=name, docs=len(docs), texts_per_s=round(stats["texts_per_s"], 1),
               peer="sentence-transformers" + (" fp16" if peer is st_half_rate else " f32"),
               peer_texts_per_s=round(peer, 1), ratio=round(stats["texts_per_s"] / peer, 3),
               bar=">= 1.0x", ok=stats["texts_per_s"] >= peer)


def bert_base(path, layers, hidden, heads, intermediate, tokenizer_from):
    """A randomly initialised BERT of the given shape, saved as a Hugging Face directory with
    the demo model's (bert-base-uncased) tokenizer."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        intermediate_size=intermediate)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, path / name)


def pytorch_steps(model_dir, groups, batch, steps, device, bf16):
    """PyTorch eager: the same lists, tokenized by the same tokenizer, the reference's
    Wasserstein loss, AdamW; median seconds per step after the first."""
    import torch, torch.nn.functional as F
    from transformers import AutoModel, PreTrainedTokenizerFast
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), pad_token="[PAD]")
    model = AutoModel.from_pretrained(model_dir).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    G = len(groups[0][1])

    def pool(enc):
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1)

    def wasserstein(logits, labels):
        X = F.softmax(logits.float(), 1).T.double(); Y = F.softmax(labels.double(), 1).T
        f = 1.0 / (X.shape[1] - 1)
        EX = X - X.mean(1, keepdim=True); EY = Y - Y.mean(1, keepdim=True)
        s = torch.linalg.svdvals(f * EX.T @ EY).sum()
        return ((X.mean(1) - Y.mean(1)) ** 2).sum() + f * (EX ** 2).sum() + f * (EY ** 2).sum() - 2 * s

    times = []
    for step in range(steps):
        part = groups[(step * batch) % len(groups):][:batch]
        q = tok([g[0] for g in part], truncation=True, max_length=64, padding=True, return_tensors="pt").to(device)
        p = tok([t for g in part for t in g[1]], truncation=True, max_length=256, padding=True,
                return_tensors="pt").to(device)
        q.pop("token_type_ids", None); p.pop("token_type_ids", None)
        labels = torch.zeros(len(part), len(part) * G, device=device)
        for i in range(len(part)):
            labels[i, i * G:(i + 1) * G] = torch.tensor([3.0, 2.0, 1.0, 0.0][:G])
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = pool(q) @ pool(p).T
        loss = wasserstein(logits, labels)
        opt.zero_grad(); loss.backward(); opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def check_training(sr, args):
    docs, queries = scifact_slice(args, args.docs)
    model = sr.root / "bert-model"
    if not (model / "model.safetensors").exists():
        bert_base(model, *args.bert, tokenizer_from=args.model)
    rng = random.Random(0)
    groups_needed = args.train_batch * args.steps
    data = sr.root / "train-data"
    data.mkdir(parents=True, exist_ok=True)
    qs = [dict(q, _id=f"{q['_id']}-{i}") for i, q in enumerate((queries * (groups_needed // len(queries) + 1))[:groups_needed])]
    qrels, groups = [], []
    by_id = {d["_id"]: d for d in docs}
    for q in qs:
        picked = rng.sample(docs, 4)
        qrels += [(q["_id"], d["_id"], label) for d, label in zip(picked, (3, 2, 1, 0))]
        groups.append((q["text"], [(d.get("title", "") + " " + d["text"]).strip() for d in picked]))
    write_jsonl(data / "queries.jsonl", qs)
    write_jsonl(data / "corpus.jsonl", list(by_id.values()))
    write_qrels(data / "qrels.tsv", qrels)
    torch_device = "cuda" if args.device != "cpu" else "cpu"
    for precision in ("f32", "bf16"):
        train = {"max_passage_len": 256, "loss": "wasserstein", "batch_size": args.train_batch,
                 "epochs": 1, "lr": 1e-5, "seed": 1, "device": args.device, "precision": precision}
        work = sr.run(f"train-{precision}", lists_pipeline(data, model, train))
        log = sr.sql(work, "SELECT step, samples_per_s FROM train.train_log ORDER BY step")
        ours = statistics.median(args.train_batch / r["samples_per_s"] for r in log[1:])
        peer = pytorch_steps(model, groups, args.train_batch, args.steps, torch_device, precision == "bf16")
        report("train", precision=precision, shape=args.bert, batch=f"{args.train_batch}x4",
               device=sr.stats(work, "train")["device"], step_s=round(ours, 4),
               peer="PyTorch eager" + (" bf16 autocast" if precision == "bf16" else " f32"),
               peer_step_s=round(peer, 4), ratio=round(ours / peer, 3), bar="<= 1.5x", ok=ours <= 1.5 * peer)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the synthrank binary")
    ap.add_argument("--model", type=Path, required=True, help="all-MiniLM-L6-v2 directory")
    ap.add_argument("--data", type=Path, required=True, help="a BEIR SciFact directory")
    ap.add_argument("--golden", type=Path, required=True, help="directory of train_steps.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/synthrank-gpu-check"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes (CPU plumbing check)")
    ap.add_argument("--only", nargs="*", default=["golden", "embeddings", "training"])
    args = ap.parse_args()
    # BERT-base: 12 layers, 768 hidden, 12 heads, 3072 intermediate; 64 lists per step.
    args.bert = (2, 128, 2, 512) if args.quick else (12, 768, 12, 3072)
    args.train_batch, args.steps = (4, 3) if args.quick else (64, 6)
    args.docs, args.batch = (64, 16) if args.quick else (2000, 128)
    args.model, args.data, args.golden = (p.resolve() for p in (args.model, args.data, args.golden))
    sr = Synthrank(os.path.abspath(args.bin), args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    checks = {"golden": check_golden, "embeddings": check_embeddings, "training": check_training}
    for name in args.only:
        start = time.perf_counter()
        checks[name](sr, args)
        print(f"# {name}: {time.perf_counter() - start:.1f} s", flush=True)
    print("\n| check | what | synthrank | peer / reference | result |\n|---|---|---|---|---|")
    for r in RESULTS:
        if r["check"] == "golden":
            row = ("golden", f"5 steps on {r['device']}", f"loss rel {r['worst_loss_rel']:.1e}, probe {r['probe_max_diff']:.1e}", "PyTorch f32 (golden)", r["ok"])
        elif r["check"] == "parity":
            if "skipped" in r:
                row = ("parity", r["backend"], "-", "-", "skipped: " + r["skipped"])
            else:
                row = ("parity", f"{r['backend']} on {r['device']}", f"max diff {r['max_diff']:.1e}", f"sentence-transformers (<= {r['tolerance']})", r["ok"])
        elif r["check"] == "embed":
            row = ("embed", r["backend"], f"{r['texts_per_s']} docs/s", f"{r['peer']} {r['peer_texts_per_s']} docs/s", f"{r['ratio']}x (bar >= 1.0x): {r['ok']}")
        else:
            row = ("train", f"{r['precision']} {r['batch']} on {r['device']}", f"{r['step_s']} s/step", f"{r['peer']} {r['peer_step_s']} s/step", f"{r['ratio']}x (bar <= 1.5x): {r['ok']}")
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
