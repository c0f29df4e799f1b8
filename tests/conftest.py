import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (obs_helpers, workers) importable by name

from hf_helpers import hf_folder, trained_run  # noqa: E402,F401  (session fixtures: one debug run + its HF export)

# The slowest test files first. pytest-xdist's `--dist loadfile` hands files to its workers in
# collection order, so a long file collected last ran alone at the end while the other worker sat
# idle; started first, the short files fill in around it. Ranked by one worker's seconds per file
# (fresh clone, 2 cores, 2026-12-02, `--durations`); the order of tests inside a file is unchanged.
SLOW_FIRST = (
    "test_resume.py", "test_resume_safety.py", "test_shipped_configs.py", "test_torch215.py",
    "test_two_hosts.py", "test_slurm.py", "test_trainer.py", "test_runfolder.py", "test_loss.py",
    "test_observability.py", "test_torch211.py", "test_checkpoint_trust.py", "test_benchmarks.py",
    "test_trainer_ac.py", "test_reweight.py", "test_documents_trainer.py", "test_duplicates.py",
    "test_early_errors.py", "test_warmup_mode.py", "test_eval.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(SLOW_FIRST)))
