"""`python -m torch.distributed.run ... tests/obs_worker.py CAPTURE.json --config ... [overrides]`:
the real `python -m titan_rw.train` entry point (ReweightTrainer, its RunLogger), plus, on rank 0,
a JSON of the inputs the observability tests recompute the logged statistics from:

    {step: {"groups": [{"losses": [...], "valid": [...]}, ...],   # each group's gathered f_i
            "prov": [[{"domain", "n_tokens", "doc_id"}, ...], ...]}}  # rank 0's rows, served order

The losses are the reweighting's input (the gathered per-sample losses); nothing the RunLogger
derives from them (weights, b, bound, domains) is captured: the tests recompute those.
"""

import json
import os
import sys

import titan_rw  # noqa: F401  (compat patches before torchtitan)

from titan_rw.observability.run_logger import RunLogger
from titan_rw.train import train_main


def _docs(p) -> list:
    if not p:
        return []
    return [p] if isinstance(p, dict) else [d for d in p if d]


def main(out_path: str, argv: list[str]) -> int:
    captured: dict[int, dict] = {}
    plain = RunLogger.record

    def record(self, step, stats, *, provenance=None, **kw):
        if self.enabled:  # rank 0's logger
            groups = list(stats) if isinstance(stats, (list, tuple)) else [stats]
            captured[int(step)] = {
                "groups": [{"losses": g.losses.detach().double().cpu().tolist(),
                            "valid": g.valid.detach().cpu().tolist()} for g in groups],
                "prov": [[{k: d.get(k) for k in ("domain", "n_tokens", "doc_id")} for d in _docs(p)]
                         for p in (provenance or [])],
            }
        return plain(self, step, stats, provenance=provenance, **kw)

    RunLogger.record = record
    try:
        code = train_main(argv)
    finally:
        RunLogger.record = plain
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as fh:
            json.dump(captured, fh, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
