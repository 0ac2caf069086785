"""A process for tests/acceptance/test_forkserver.py to look at: prints what it was started
with as one JSON line, then waits for a signal (Ctrl-C exits 3)."""

import json
import os
import signal
import sys

print(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "probe": os.environ.get("GANNS_PROBE"),
                  "torch": "torch" in sys.modules}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1:] == ["exit"]:
    sys.exit(7)
try:
    signal.pause()
except KeyboardInterrupt:
    sys.exit(3)
