"""The TensorBoard sink: every charted scalar of a row under its tag (`names.tag_of`), the weight
histogram in explicit buckets up to the bound 2/b, the loss and window histograms, the samples
tables as text, and the Custom Scalars layout (written once, when the sink opens)."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

import numpy as np

from titan_rw.observability.names import HIST_TAGS, TEXT_TAGS, WINDOW_TAGS, charted_scalars, tensorboard_layout
from titan_rw.observability.provenance import samples_markdown
from titan_rw.observability.rows import Interval, weight_buckets


def tb_writer_of(metrics_processor) -> Any | None:
    """The SummaryWriter inside a TorchTitan MetricsProcessor (None when TensorBoard is off there).

    Passing it to `RunLogger.Config.build(writer=...)` puts our tags in TorchTitan's own event
    directory, so TensorBoard shows one run with both sets of tags."""
    lg = getattr(metrics_processor, "logger", None)
    for sub in getattr(lg, "_loggers", [lg]):
        w = getattr(sub, "writer", None)
        if w is not None:
            return w
    return None


def write_weight_histogram(writer, tag: str, weights: np.ndarray, bound: float, step: int) -> None:
    """The weights' histogram over [0, max(bound, max w)] in equal buckets, empty ones included, so
    the Histograms tab's axis always reaches the bound. Written in TensorBoard's histogram format of
    explicit (left, right, count) buckets: the older format (`add_histogram`) loses the empty
    buckets and would stretch the last filled one to the axis end."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.histogram import metadata as hist_metadata
    from tensorboard.util import tensor_util

    counts, edges = weight_buckets(weights, bound)
    buckets = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    value = Summary.Value(tag=tag, metadata=hist_metadata.create_summary_metadata(display_name=tag, description=""),
                          tensor=tensor_util.make_tensor_proto(buckets))
    writer._get_file_writer().add_summary(Summary(value=[value]), step)


def _quiet_thread_errors() -> None:
    """TensorBoard writes event files from a thread, which prints its OSError (a full disk) as a
    traceback and raises it again at the writer's next call, where the RunLogger turns it into
    the one line of `jsonl.write_failure`: the thread's copy is not printed (once per process)."""
    import threading

    prev = threading.excepthook
    if getattr(prev, "_titan_rw", False):
        return

    def hook(args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        prev(args)

    hook._titan_rw = True
    threading.excepthook = hook


class TensorBoardSink:
    """Writes into `writer` (TorchTitan's, shared) or its own SummaryWriter under
    `<dump_folder>/tb/<date-time>` (or `tb_dir`)."""

    def __init__(self, dump_folder: str, *, writer: Any | None = None, tb_dir: str | None = None):
        _quiet_thread_errors()
        if writer is not None:
            self.writer, self.own = writer, False
            self.tb_dir = getattr(writer, "log_dir", None) or writer.get_logdir()
        else:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = tb_dir or os.path.join(dump_folder, "tb", datetime.now().strftime("%Y%m%d-%H%M"))
            self.writer, self.own = SummaryWriter(self.tb_dir, max_queue=1000), True
        self.writer.add_custom_scalars(tensorboard_layout())

    def write(self, iv: Interval) -> None:
        wr = self.writer
        for row in iv.rows:
            for tag, x in charted_scalars(row):
                wr.add_scalar(tag, x, row["step"])
        for h in iv.histograms:
            write_weight_histogram(wr, HIST_TAGS["weights"], h.weights, h.bound, h.step)
            wr.add_histogram(HIST_TAGS["losses"], h.losses, h.step)
        if iv.window is not None and iv.rows:
            wr.add_histogram(WINDOW_TAGS["max_weight"], iv.window[:, 0], iv.rows[-1]["step"])
            wr.add_histogram(WINDOW_TAGS["bound_ratio"], iv.window[:, 1], iv.rows[-1]["step"])

    def write_samples(self, iv: Interval) -> None:
        for s in iv.samples:
            for which in ("top", "bottom"):
                self.writer.add_text(TEXT_TAGS[which], samples_markdown(s, which), s["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        if self.own:
            self.writer.close()

    def abandon(self) -> None:
        """After a failed write: close an own writer quietly (its event file is on the full disk)."""
        if self.own:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - the event file is on the same full disk
                pass
