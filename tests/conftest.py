import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (obs_helpers, workers) importable by name
