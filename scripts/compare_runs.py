"""Compare the logs of two run folders (or two folders of runs): are they the same, bit for bit?

    python scripts/compare_runs.py BEFORE AFTER          # exit 0: identical, 1: a difference (listed)

BEFORE and AFTER are run folders (a dump_folder with metrics.jsonl) or folders whose sub-folders are
run folders, matched by name (scripts/observability_runs.sh writes `one`, `two` and `docs`).

What must be equal, per run:
- metrics.jsonl: every line the same bytes, once the wall-clock fields below are taken out of both
  (each line must also be exactly `json.dumps` of its parsed object, so taking a field out and
  writing the rest back changes nothing else: key order, float digits and spacing all compared);
- samples.jsonl: the same bytes (no field depends on the clock);
- TensorBoard: every scalar tag, its steps and values (float32 as stored) the same, but for the
  wall-clock tags below; also titan_rw's histograms (explicit buckets and the older format) and
  text tensors, and the Custom Scalars layout. Wall times of the events are not compared.

Left out, because they measure the clock and not the run:
- `tokens_per_sec` (metrics.jsonl) / `perf/tokens_per_sec` (TensorBoard): tokens over the wall time
  of the log interval; `mfu` / `perf/mfu` derive from it (GPU only).
Nothing else is left out: TorchTitan's MetricsProcessor shares the event directory but writes no
scalars of its own in these runs (the reweighted train_step does not call its `log`), so a timing
tag of TorchTitan's would show up here as a difference, not be hidden.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections import OrderedDict

CLOCK_FIELDS = ("tokens_per_sec", "mfu")
CLOCK_TAGS = re.compile(r"^perf/(tokens_per_sec|mfu)$")


def _run_folders(root: str) -> dict[str, str]:
    if os.path.isfile(os.path.join(root, "metrics.jsonl")):
        return {".": root}
    return {d: os.path.join(root, d) for d in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, d, "metrics.jsonl"))}


def _metrics_lines(path: str, problems: list[str]) -> list[str]:
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh.read().splitlines(), 1):
            row = json.loads(line, object_pairs_hook=OrderedDict)
            if json.dumps(row) != line:
                problems.append(f"{path}:{n}: the line is not json.dumps of its own object")
            for k in CLOCK_FIELDS:
                row.pop(k, None)
            out.append(json.dumps(row))
    return out


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b), 1):
        if x != y:
            return f"line {i}:\n    before {x[:400]}\n    after  {y[:400]}"
    return f"{len(a)} vs {len(b)} lines"


def _events(run: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict = {"scalars": {}, "tensors": {}, "histograms": {}, "layout": None}
    dirs = sorted({root for root, _, files in os.walk(run) if any(f.startswith("events.out.tfevents") for f in files)})
    for d in dirs:
        ea = EventAccumulator(d, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        ea.Reload()
        tags = ea.Tags()
        for t in tags.get("scalars", []):
            if not CLOCK_TAGS.match(t):
                # the float32 as stored, by its bits (NaN equals NaN, 0.0 differs from -0.0)
                found["scalars"][t] = [(e.step, struct.pack("<f", e.value)) for e in ea.Scalars(t)]
        for t in tags.get("tensors", []):
            found["tensors"][t] = [(e.step, e.tensor_proto.SerializeToString(deterministic=True)) for e in ea.Tensors(t)]
        for t in tags.get("histograms", []):
            found["histograms"][t] = [(e.step, str(e.histogram_value)) for e in ea.Histograms(t)]
        try:
            found["layout"] = str(ea.PluginTagToContent("custom_scalars"))
        except KeyError:
            pass
    found["dirs"] = len(dirs)
    return found


def compare_run(before: str, after: str) -> list[str]:
    problems: list[str] = []
    a = _metrics_lines(os.path.join(before, "metrics.jsonl"), problems)
    b = _metrics_lines(os.path.join(after, "metrics.jsonl"), problems)
    if a != b:
        problems.append("metrics.jsonl differs: " + _first_difference(a, b))
    sa, sb = (os.path.join(x, "samples.jsonl") for x in (before, after))
    if os.path.exists(sa) != os.path.exists(sb):
        problems.append("samples.jsonl exists in only one of them")
    elif os.path.exists(sa):
        with open(sa, "rb") as fa, open(sb, "rb") as fb:
            la, lb = fa.read().decode().splitlines(), fb.read().decode().splitlines()
        if la != lb:
            problems.append("samples.jsonl differs: " + _first_difference(la, lb))
    ea, eb = _events(before), _events(after)
    if ea["dirs"] != eb["dirs"]:
        problems.append(f"event directories: {ea['dirs']} vs {eb['dirs']}")
    for kind in ("scalars", "tensors", "histograms"):
        ta, tb = ea[kind], eb[kind]
        if set(ta) != set(tb):
            problems.append(f"TensorBoard {kind}: tags only before {sorted(set(ta) - set(tb))}, "
                            f"only after {sorted(set(tb) - set(ta))}")
        for t in sorted(set(ta) & set(tb)):
            if ta[t] != tb[t]:
                bad = next((i for i, (x, y) in enumerate(zip(ta[t], tb[t])) if x != y), min(len(ta[t]), len(tb[t])))
                problems.append(f"TensorBoard {kind} {t}: first difference at event {bad} "
                                f"({ta[t][bad:bad + 1]} vs {tb[t][bad:bad + 1]})"[:600])
    if ea["layout"] != eb["layout"]:
        problems.append("TensorBoard Custom Scalars layout differs")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    ra, rb = (_run_folders(x) for x in argv)
    if not ra or set(ra) != set(rb):
        print(f"run folders differ or none found: {sorted(ra)} vs {sorted(rb)}")
        return 1
    failed = False
    for name in ra:
        problems = compare_run(ra[name], rb[name])
        ev = _events(ra[name])
        summary = (f"{sum(1 for _ in open(os.path.join(ra[name], 'metrics.jsonl')))} metrics rows, "
                   f"{len(ev['scalars'])} scalar tags ({sum(len(v) for v in ev['scalars'].values())} points), "
                   f"{len(ev['tensors'])} tensor tags, {len(ev['histograms'])} histogram tags")
        print(f"{name}: {'IDENTICAL' if not problems else 'DIFFERENT'} ({summary})")
        for p in problems:
            print("  " + p)
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
