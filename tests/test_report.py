"""`titan-rw report`: PNGs and summary.md from the short real runs (tests/obs_helpers.py)."""

import json
import os
import re

import pytest

from helpers import distinct_colors
from obs_helpers import shared_runs
from titan_rw.observability.jsonl import read_metrics
from titan_rw.report import make_report, report_main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def _png_ok(path):
    import matplotlib.image as mpimg

    assert os.path.getsize(path) > 5000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, (path, img.shape)
    colors = distinct_colors(img)
    assert colors > 20, f"{path}: {colors} colors, looks blank"


def test_report_one_run_default_folder(runs, capsys):
    run = runs["linupper"]
    assert report_main([run]) == 0
    out = os.path.join(run, "report")
    names = sorted(os.listdir(out))
    figs = ["domain_weight", "fig6_max_weight", "loss", "max_weight_steps"]
    assert names == sorted([f"{f}.{ext}" for f in figs for ext in ("pdf", "png")] + ["summary.md"])
    for f in figs:  # publication resolution, and a vector PDF beside each PNG
        assert open(os.path.join(out, f + ".pdf"), "rb").read(5) == b"%PDF-"
    for n in names:
        if n.endswith(".png"):
            _png_ok(os.path.join(out, n))
    rows = read_metrics(run)
    summary = open(os.path.join(out, "summary.md")).read()
    line = next(l for l in summary.splitlines() if l.startswith("| linupper"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # run | steps | last step | final loss | final weighted | max of max_weight | 2/b | max ratio | violations
    assert int(cells[1]) == len(rows) and int(cells[2]) == rows[-1]["step"]
    assert cells[5] == f"{max(r['max_weight'] for r in rows):.5g}"  # rounded, from metrics.jsonl
    assert float(cells[6]) == pytest.approx(2 / rows[0]["b"])
    assert int(cells[8]) == sum(r["bound_violations"] for r in rows) == 0
    assert float(cells[3]) == pytest.approx(rows[-1]["loss"], rel=1e-3)
    assert "![fig6_max_weight.png](fig6_max_weight.png)" in summary
    assert "most weighted" in summary and "<urn:titan-rw:" in summary
    assert "0 violations" in capsys.readouterr().out


def test_report_compares_runs(runs, tmp_path):
    res = make_report([runs["uniform"], runs["linupper"]], str(tmp_path / "cmp"))
    assert [s["run"] for s in res["runs"]] == ["uniform", "linupper"]
    for f in res["figures"]:
        _png_ok(f)
    uni = res["runs"][0]
    assert uni["max_max_weight"] == pytest.approx(1 / 16) and uni["max_bound_ratio"] == pytest.approx(0.5)
    summary = open(res["summary"]).read()
    assert "| uniform |" in summary and "| linupper |" in summary


def test_report_counts_violations_and_labels_strategy(tmp_path):
    run = tmp_path / "exp1"
    run.mkdir()
    rows = [
        {"step": s, "loss": 3.0 - 0.1 * s, "weighted_loss": 3.1 - 0.1 * s, "max_weight": mw,
         "max_weight_bound": 2 / 128, "b": 128, "bound_ratio": mw * 64, "strategy": "linupper"}
        for s, mw in enumerate([0.01, 0.02, 0.012, 0.03], 1)
    ]  # an older metrics.jsonl without bound_violations: the report recomputes them
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = make_report([str(run)])
    s = res["runs"][0]
    assert s["run"] == "exp1 (linupper)" and s["violations"] == 2 and s["max_max_weight"] == 0.03
    assert "domain_weight.png" not in " ".join(res["figures"])  # no provenance logged


def test_report_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert report_main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing / "metrics.jsonl") in err and "no metrics file" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"empty.metrics\.jsonl: empty metrics file", err), err


def _fig6(tmp_path, monkeypatch, name: str, rows: list[dict], warmup_steps: int, panels: int = 1):
    """Figure 6 drawn from one run folder of `rows` (shown `panels` times): the saved figure."""
    from titan_rw import report

    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run_config.toml").write_text(f"[reweight]\nwarmup_steps = {warmup_steps}\n")
    figs = []
    real_save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: (figs.append(fig), real_save(fig, path))[1])
    report.fig6([report.Run(str(run))] * panels, str(tmp_path / "fig6.png"))
    return figs[0]


def test_fig6_leaves_out_the_warmup_steps(tmp_path, monkeypatch):
    """Figure 6 shows the strategy's steps: the warm-up temperature's steps (run_config.toml) are out."""
    rows = [{"step": s, "loss": 3.0, "weighted_loss": 3.0, "max_weight": 0.5 if s <= 5 else 0.01 + 0.001 * s,
             "max_weight_bound": 2 / 128, "b": 128, "bound_ratio": 0.5} for s in range(1, 21)]
    (ax,) = _fig6(tmp_path, monkeypatch, "exp2", rows, warmup_steps=5).axes
    assert "15 steps, warm-up steps 1-5 excluded" in ax.get_title()
    assert sum(p.get_height() for p in ax.patches) == 15 and ax.get_xlim()[1] < 0.1  # the 0.5 outliers are out


def test_fig6_titles_fit_inside_the_figure(tmp_path, monkeypatch):
    """Every panel title of Figure 6, as rendered in the saved figure, lies inside the figure's
    width (a long run name with the warm-up note ran off both edges of the PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [{"step": s, "loss": 3.0, "weighted_loss": 3.0, "max_weight": 0.01 + 0.001 * s, "strategy": "linupper",
             "max_weight_bound": 2 / 128, "b": 128, "bound_ratio": 0.5} for s in range(1, 201)]
    fig = _fig6(tmp_path, monkeypatch, "linupper_r1_cap2_seed0_a_rather_long_run_name", rows, warmup_steps=100, panels=2)
    canvas = FigureCanvasAgg(fig)  # pyplot closed the figure; draw it again at its saved layout
    canvas.draw()
    renderer = canvas.get_renderer()
    width = fig.bbox.width
    for ax in fig.axes:
        box = ax.title.get_window_extent(renderer)
        assert ax.get_title(), "a panel without a title"
        assert box.x0 >= 0 and box.x1 <= width, (ax.get_title(), box.x0, box.x1, width)
