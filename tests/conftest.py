import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (obs_helpers, workers) importable by name

from hf_helpers import hf_folder, trained_run  # noqa: E402,F401  (session fixtures: one debug run + its HF export)
