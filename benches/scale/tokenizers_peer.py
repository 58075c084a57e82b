"""The peer of the `tokenize` stage: the `tokenizers` library's own encode_batch on the same
passages (read from `synthrank export ... lists --format tsv`, not timed), same tokenizer and
truncation, 8,192 passages per call as the stage encodes them (the encodings of 2M passages at
once do not fit in 24 GiB). Prints seconds."""
import sys
import time

from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file(sys.argv[1])
tokenizer.no_padding()
tokenizer.enable_truncation(int(sys.argv[3]))
with open(sys.argv[2]) as f:
    header = f.readline().rstrip("\n").split("\t")
    title, text = header.index("title"), header.index("text")
    passages = []
    for line in f:
        fields = line.rstrip("\n").split("\t")
        passages.append(f"{fields[title]} {fields[text]}".strip())
started = time.perf_counter()
encoded = 0
for start in range(0, len(passages), 8192):
    encoded += len(tokenizer.encode_batch(passages[start : start + 8192]))
elapsed = time.perf_counter() - started
assert encoded == len(passages)
print(f"{elapsed:.2f}")
