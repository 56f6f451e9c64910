"""A collector for the kill -9 tests: answers N fixed requests through the real `ChatClient`.

    python collect.py '<ChatConfig overrides as JSON>' N [first]

Requests `q{first}` .. `q{first+N-1}` (one user message each, n=1) go in one batch; warnings are logged to
stderr; the last stdout line is JSON: the client's `stats()`, the cache's `totals()` and the answers.
"""
import json, logging, sys

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from imitation_nb.teacher import ChatClient  # noqa: E402

cfg, n = json.loads(sys.argv[1]), int(sys.argv[2])
first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
reqs = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"question number {i}"}], "max_tokens": 16}
        for i in range(first, first + n)]
with ChatClient(cfg) as client:
    out = client.complete(reqs)
    print(json.dumps({"stats": client.stats(), "totals": client.cache.totals(),
                      "answers": {o["id"]: o["content"] for o in out}}), flush=True)
