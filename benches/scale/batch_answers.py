"""Answers a batch input file as vLLM's run_batch would, for the generate scale benchmark:
one all-levels JSON answer per request (four passages of ~100 synthetic words, ~2.8 KB, about
what an LLM writes for the graded-passages prompt), in the OpenAI Batch output format.

Usage: batch_answers.py INPUT OUTPUT
"""
import json
import random
import sys

VOCAB = [f"w{i:x}" for i in range(30_000)]


def answer(input_path, output_path, seed=7):
    """Writes one result per request of `input_path` to `output_path`; returns how many."""
    rng = random.Random(seed)
    count = 0
    with open(input_path) as requests, open(output_path, "w") as out:
        for line in requests:
            custom_id = json.loads(line)["custom_id"]
            passages = {
                str(level): {
                    "title": " ".join(rng.choices(VOCAB, k=5)),
                    "text": " ".join(rng.choices(VOCAB, k=100)),
                }
                for level in (3, 2, 1, 0)
            }
            body = {
                "model": "scale",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(passages)},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 330, "completion_tokens": 620},
            }
            result = {"custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": None}
            out.write(json.dumps(result) + "\n")
            count += 1
    return count


if __name__ == "__main__":
    answer(sys.argv[1], sys.argv[2])
