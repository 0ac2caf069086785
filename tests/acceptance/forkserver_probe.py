"""A process for tests/acceptance/test_forkserver.py to look at: prints what it was started
with as one JSON line, then waits for a signal (Ctrl-C exits 3)."""

import json
import os
import signal
import sys

seen = {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "probe": os.environ.get("GANNS_PROBE"),
        "torch": "torch" in sys.modules}
if os.environ.get("GANNS_PROBE_HUB"):
    # What huggingface_hub read when it was imported, and whether ganns_async holds the same
    # huggingface_hub that a fresh import gives.
    import huggingface_hub
    from huggingface_hub import constants

    import ganns_async.model

    seen["hf_hub_cache"] = constants.HF_HUB_CACHE
    seen["same_hub"] = ganns_async.model.PyTorchModelHubMixin is huggingface_hub.PyTorchModelHubMixin
print(json.dumps(seen), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1:] == ["exit"]:
    sys.exit(7)
try:
    signal.pause()
except KeyboardInterrupt:
    sys.exit(3)
