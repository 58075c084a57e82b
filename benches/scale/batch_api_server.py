"""An OpenAI Batch API on 127.0.0.1 for the generate scale benchmark: `/v1/files` (upload,
content), `/v1/batches` (create, list, get). A batch is answered by batch_answers.py when it is
first polled. Files live under DIR. The list is one page, newest first.

Usage: batch_api_server.py DIR PORT
"""
import http.server
import json
import os
import re
import sys
import threading
import time

from batch_answers import answer

DIR, PORT = sys.argv[1], int(sys.argv[2])
os.makedirs(DIR, exist_ok=True)
lock = threading.Lock()
files, batches = [], []


def new_file(path):
    files.append((path, int(time.time())))
    return f"file-{len(files) - 1}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        return self.rfile.read(int(self.headers["Content-Length"]))

    def do_POST(self):
        if self.path == "/v1/files":
            raw = self.body()
            start = raw.index(b"application/jsonl\r\n\r\n") + len(b"application/jsonl\r\n\r\n")
            end = raw.rindex(b"\r\n--")
            with lock:
                path = os.path.join(DIR, f"upload-{len(files)}.jsonl")
                with open(path, "wb") as f:
                    f.write(raw[start:end])
                file_id = new_file(path)
                self.reply(200, {"id": file_id, "purpose": "batch", "created_at": files[-1][1]})
        elif self.path == "/v1/batches":
            request = json.loads(self.body())
            with lock:
                batch = {"id": f"batch-{len(batches)}", "status": "in_progress",
                         "input_file_id": request["input_file_id"],
                         "created_at": int(time.time()),
                         "request_counts": {"total": 0, "completed": 0, "failed": 0}}
                batches.append(batch)
                self.reply(200, batch)
        else:
            self.reply(404, {})

    def do_GET(self):
        with lock:
            if self.path.startswith("/v1/batches?"):
                return self.reply(200, {"data": batches[::-1], "has_more": False})
            match = re.fullmatch(r"/v1/batches/batch-(\d+)", self.path)
            if match:
                batch = batches[int(match[1])]
                if batch["status"] == "in_progress":
                    source = files[int(batch["input_file_id"][5:])][0]
                    output = os.path.join(DIR, f"output-{match[1]}.jsonl")
                    done = answer(source, output, seed=int(match[1]))
                    batch.update(status="completed", output_file_id=new_file(output),
                                 request_counts={"total": done, "completed": done, "failed": 0})
                return self.reply(200, batch)
            match = re.fullmatch(r"/v1/files/file-(\d+)/content", self.path)
            if match:
                with open(files[int(match[1])][0], "rb") as f:
                    return self.reply(200, f.read(), "application/jsonl")
            match = re.fullmatch(r"/v1/files/file-(\d+)", self.path)
            if match:
                return self.reply(200, {"id": f"file-{match[1]}", "created_at": files[int(match[1])][1]})
        self.reply(404, {})

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
