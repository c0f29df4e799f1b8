"""Unit checks of titan_rw.faults / titan_rw.fault_injection that the end-to-end runs of
test_resume.py and test_observability.py don't isolate: when the [fault_injection] section counts
as used, the [fault] checks' messages, the rows audit's weights (kept on device until its flush),
and NonFiniteSkipOptimizers' counters and skipped updates against a plain optimizer stepped only
on the good steps."""

import json
from dataclasses import fields

import pytest
import torch

from torchtitan.components.optimizer.optimizer import ParamGroupConfig

from titan_rw.fault_injection import FaultInjection
from titan_rw.faults import NonFiniteSkipOptimizers, RowAudit, StopGuard


def test_fault_injection_used_by_any_knob():
    C = FaultInjection.Config
    assert not C().used()
    knobs = {f.name for f in fields(C)}
    changed = {"nan_loss_steps": [2], "nan_grad_steps": [3], "rank": 1, "kill_at_step": 3, "kill_rank": 0,
               "hang_at_step": 2, "signal_at_step": 4}
    assert set(changed) == knobs  # every knob is tried below
    for k, v in changed.items():
        assert C(**{k: v}).used(), k
    assert not C(nan_loss_steps=[], kill_at_step=0, kill_rank=-1).used()  # set to the defaults


def test_row_audit_writes_each_steps_weights_at_the_flush(tmp_path):
    """fault.audit_rows: the weights stay on device until flush (log steps, before a checkpoint,
    close), then every pending step gets its own line, with its own weights, float32 exactly."""
    audit = RowAudit(str(tmp_path), rank=3)
    w1 = torch.tensor([0.1, 0.2], dtype=torch.float32)
    w2 = torch.tensor([1 / 3, 2 / 3, 1e-7], dtype=torch.float32)
    audit.record(1, 3, [["a", 0, 6], ["a", 0, 7]], w1)
    audit.record(2, 3, [["a", 0, 14], None, ["b", 1, 2]], w2)
    path = tmp_path / "audit" / "rank3.jsonl"
    assert path.read_text() == ""  # nothing read or written before the flush
    audit.flush()
    audit.record(3, 3, [["a", 0, 22]], torch.tensor([0.5]))
    audit.close()  # flushes step 3
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and {x["dp_rank"] for x in lines} == {3}
    assert lines[1]["rows"] == [["a", 0, 14], None, ["b", 1, 2]]
    for line, w in zip(lines, (w1, w2, torch.tensor([0.5]))):
        assert torch.equal(torch.tensor(line["weights"], dtype=torch.float32), w)


@pytest.mark.parametrize("kw,needle", [
    ({"max_consecutive_skips": -1}, "fault.max_consecutive_skips must be >= 0, got -1"),
    ({"signal_check_interval": 0}, "fault.signal_check_interval must be >= 1, got 0"),
    ({"signal_exit_code": 256}, "fault.signal_exit_code must be -1 or 0..255, got 256"),
    ({"signal_exit_code": -2}, "fault.signal_exit_code must be -1 or 0..255, got -2"),
])
def test_stop_guard_validate_names_the_key(kw, needle):
    with pytest.raises(ValueError) as e:
        StopGuard.Config(**kw).validate()
    assert needle in str(e.value)


def test_stop_guard_validate_accepts_the_edges():
    for kw in ({"max_consecutive_skips": 0}, {"signal_check_interval": 1}, {"signal_exit_code": -1},
               {"signal_exit_code": 0}, {"signal_exit_code": 255}):
        StopGuard.Config(**kw).validate()


# (gradient norm, non-finite samples) of each step; a bad step is skipped
STEPS = [(1.0, 0), (float("nan"), 0), (1.0, 1), (float("inf"), 0), (1.0, 0), (1.0, 2), (1.0, 0), (1.0, 0)]
READS = {3: None, 5: None, 7: None}  # worst_run_since_last_read after these steps (0-based)


@pytest.mark.parametrize("implementation", ["for-loop", "fused"])
def test_non_finite_skip_counters_and_updates(implementation):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    cfg = NonFiniteSkipOptimizers.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="AdamW",
                                       optimizer_kwargs={"lr": 0.1, "weight_decay": 0.01})],
        implementation=implementation)
    opt = NonFiniteSkipOptimizers(cfg, model_parts=[model])
    assert opt.fused is (implementation == "fused")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    total = run = worst = 0
    for i, (gn, nonfinite) in enumerate(STEPS):
        grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step_unless_nonfinite(torch.tensor(gn), torch.tensor(nonfinite))
        bad = not (gn == gn and abs(gn) != float("inf") and nonfinite == 0)
        if not bad:  # the reference steps only on the good steps, with the same gradients
            for p, g in zip(ref.parameters(), grads):
                p.grad = g.clone()
            ref_opt.step()
        total += bad
        run = run + 1 if bad else 0
        worst = max(worst, run)
        assert int(opt.skipped_now) == int(bad) and int(opt.skipped_total) == total and int(opt.consecutive) == run, i
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"step {i}")
        if i in READS:
            assert opt.worst_run_since_last_read() == worst, i
            worst = run  # a run still going on counts on into the next read
    assert total == 4 and opt.skip_state() == {"skipped_steps": 4, "consecutive_skips": 0}
    opt.load_skip_state({"skipped_steps": 7, "consecutive_skips": 2})
    assert opt.skip_state() == {"skipped_steps": 7, "consecutive_skips": 2} and opt.worst_run_since_last_read() == 2
