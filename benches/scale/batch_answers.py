"""Answers a batch input file as vLLM's run_batch would, for the generate scale benchmark:
one all-levels JSON answer per request (four passages of ~100 synthetic words, ~2.8 KB, about
what an LLM writes for the graded-passages prompt), in the OpenAI Batch output format.

Usage: batch_answers.py INPUT OUTPUT
"""
import json
import random
import sys

rng = random.Random(7)
vocab = [f"w{i:x}" for i in range(30_000)]
with open(sys.argv[1]) as requests, open(sys.argv[2], "w") as out:
    for line in requests:
        custom_id = json.loads(line)["custom_id"]
        answer = {
            str(level): {
                "title": " ".join(rng.choices(vocab, k=5)),
                "text": " ".join(rng.choices(vocab, k=100)),
            }
            for level in (3, 2, 1, 0)
        }
        body = {
            "model": "scale",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(answer)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 330, "completion_tokens": 620},
        }
        result = {"custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": None}
        out.write(json.dumps(result) + "\n")
