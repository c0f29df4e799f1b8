"""Observability of the reweighted run: named metrics on the device, one transfer per log interval,
named rows on the host, and the sinks that write them (docs/observability.md, docs/design.md §5).

The flow, one room per module; each quantity keeps ONE name (its metrics.jsonl key) from the step
to every sink, and a chart shows it under `names.tag_of(name)`:

    device.py            the step's `WeightStats` -> named device scalars (`step_metrics`: loss,
                         weighted_loss, max_weight, b, bound_ratio, ...) and per-sample vectors;
                         `DeviceBuffer`: the interval's pending tensors, moved in ONE transfer
    rows.py              the host copy -> named rows (metrics.jsonl's objects, in file order), the
                         histogram steps and the max-weight window: an `Interval`
    provenance.py        the rows' provenance in the step's groups (`GroupLayout`), per-domain
                         statistics, the samples tables (doc id, URL, text)
    jsonl.py        metrics.jsonl and samples.jsonl: written, fsync'ed, read back, torn tails cut
    tensorboard_sink.py  scalars, the weight histogram in explicit buckets to 2/b, loss and window
                         histograms, the samples as text, the Custom Scalars layout
    wandb_sink.py        W&B (`[metrics] enable_wandb`): the same scalars, the weight histogram with
                         its bound, the samples as a table
    console.py           skipped-step and overflow warnings, the progress line
    names.py             file names, metric name -> chart tag, the Custom Scalars layout
    run_logger.py        `RunLogger`: what the trainer calls (`record_step`, `before_checkpoint`,
                         `close`); `StepRecord`, `FaultCounters`

    rl = RunLogger.Config(log_interval=10).build(dump_folder, rank, writer=..., wandb_run=...)
    rl.record_step(StepRecord(step, groups, temperature, lr, grad_norm, ntokens, ...))  # device ops only
    rl.close()

Only rank 0 writes; on other ranks every call is a no-op. This file imports nothing: import from
the room (`titan_rw.observability.run_logger.RunLogger`, `titan_rw.observability.jsonl.read_metrics`,
`titan_rw.observability.names.SCALAR_TAGS`, ...), so no room depends on all the others.
"""
