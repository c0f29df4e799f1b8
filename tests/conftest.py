import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (obs_helpers, workers) importable by name

from hf_helpers import hf_folder, trained_run  # noqa: E402,F401  (session fixtures: one debug run + its HF export)

# Every trainer process the suite starts streams the shipped corpus; they share one disk cache of its
# tokens (titan_rw.data.token_cache: keyed by the files' bytes and the tokenizer, so never stale),
# ~2 s of CPU saved per process. tests/test_token_cache.py checks the cache itself.
os.environ.setdefault("TITAN_RW_TOKEN_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"titan_rw-test-token-cache-{os.getuid()}"))
