"""A real TensorBoard server on the short run's event files, and a headless browser on it.

Fetches the histograms plugin's JSON for the weights tag (the data the page draws) and, where
Debian's chromium is installed (`apt-get install chromium`, as .ci/run's setup does), takes a
screenshot of the histograms page and checks it is not blank. The server is stopped by its PID.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from helpers import distinct_colors
from obs_helpers import B, shared_runs
from titan_rw.observability.jsonl import read_metrics
from titan_rw.observability.names import HIST_TAGS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1280,900", "--virtual-time-budget=15000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = shared_runs(tmp_path_factory)
    logdir = os.path.dirname(runs["linupper"])
    port = _free_port()
    log = open(tmp_path_factory.mktemp("tb") / "tensorboard.log", "w+")
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
           "--port", str(port), "--load_fast=false", "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        # a wait, not a timing check: it ends when the tags are served; long enough for a loaded machine
        deadline = time.monotonic() + 300
        tags = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"tensorboard exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                tags = _get(f"{base}/data/plugin/histograms/tags")
                if any(HIST_TAGS["weights"] in t for t in tags.values()) and len(tags) >= 2:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            log.seek(0)
            pytest.fail(f"tensorboard not serving the histograms within 300 s; tags={tags}\n{log.read()[-3000:]}")
        yield base, tags, runs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_histograms_plugin_serves_the_weights(server):
    base, tags, runs = server
    rows = {r["step"]: r for r in read_metrics(runs["linupper"])}
    run = next(r for r in tags if r.startswith("linupper"))
    q = urllib.parse.urlencode({"run": run, "tag": HIST_TAGS["weights"]})
    data = _get(f"{base}/data/plugin/histograms/histograms?{q}")
    assert [step for _, step, _ in data] == [1, 10, 20, 30, 40]
    for _, step, buckets in data:
        counts = [c for _, _, c in buckets]
        assert sum(counts) == pytest.approx(B, abs=1e-6)
        # the axis reaches 2/b (or the max weight, where a strategy exceeds the bound)
        bound, max_w = 2.0 / rows[step]["b"], rows[step]["max_weight"]
        assert buckets[0][0] == 0.0 and buckets[-1][1] == pytest.approx(max(bound, max_w), rel=1e-6)
        left, right, _ = [bk for bk in buckets if bk[2] > 0][-1]  # the max weight in the last filled bucket
        assert left <= max_w * (1 + 1e-6) and right >= max_w * (1 - 1e-6)
        assert right - left < max(bound, max_w) / 20  # narrow buckets, not one stretched to the axis end


def test_custom_scalars_chart_draws_max_weight_and_bound(server, tmp_path):
    """The Custom Scalars page: losses first, weights/max and bound/two_over_b in one chart."""
    base, _, runs = server
    layout = _get(f"{base}/data/plugin/custom_scalars/layout")
    cats = layout["category"]
    assert cats[0]["title"] == "losses"
    charts = {c["title"]: c["multiline"]["tag"] for cat in cats for c in cat["chart"]}
    both = next(tags for tags in charts.values() if "^weights/max$" in tags)
    assert "^bound/two_over_b$" in both
    assert any(tags == ["^data/mean_weight/"] for tags in charts.values())
    rows = read_metrics(runs["linupper"])
    run = next(r for r in _get(f"{base}/data/runs") if r.startswith("linupper"))
    for regex, key in (("^weights/max$", "max_weight"), ("^bound/two_over_b$", "max_weight_bound")):
        q = urllib.parse.urlencode({"run": run, "tag": regex})
        got = _get(f"{base}/data/plugin/custom_scalars/scalars?{q}")
        (series,) = got["tag_to_events"].values()
        assert [step for _, step, _ in series] == [r["step"] for r in rows]
        assert [v for _, _, v in series] == pytest.approx([r[key] for r in rows], rel=1e-6)
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium): screenshot skipped, JSON checked")
    shot = tmp_path / "custom_scalars.png"
    url = f"{base}/?darkMode=false#custom_scalars"
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and shot.exists(), out.stderr[-3000:]
    import matplotlib.image as mpimg

    img = (mpimg.imread(str(shot))[..., :3] * 255).astype(np.uint8)
    assert distinct_colors(img) > 50, "custom scalars page looks blank"
    keep = os.environ.get("TITAN_RW_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep.replace(".png", "") + "_custom_scalars.png")


def test_histograms_page_screenshot(server, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium): screenshot skipped, JSON checked")
    base, _, _ = server
    shot = tmp_path / "histograms.png"
    url = f"{base}/?darkMode=false#histograms&tagFilter=weight_hist"
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and shot.exists(), out.stderr[-3000:]
    assert shot.stat().st_size > 20_000, shot.stat().st_size
    import matplotlib.image as mpimg

    img = (mpimg.imread(str(shot))[..., :3] * 255).astype(np.uint8)
    assert img.shape[:2] == (900, 1280)
    colors = distinct_colors(img)
    assert colors > 50, f"screenshot has {colors} colors: blank page?"
    # TensorBoard's orange header and the histograms' drawn areas: more than background + text
    assert (img.std(axis=(0, 1)) > 10).all()
    keep = os.environ.get("TITAN_RW_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
