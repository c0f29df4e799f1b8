"""Subprocess helper of tests/test_eval.py: the *trainer's* loss vs the lm-eval adapter.

    python tests/eval_worker.py RUN_DIR STEP OUT.json -- <train overrides...>

Builds `ReweightTrainer` from the same config as the run, loads the step-STEP checkpoint through
TorchTitan's CheckpointManager, and computes per-sample losses with the training path
(`trainer._per_sample` → model with _skip_lm_head → `titan_rw.loss.per_sample_loss`, granularity row). Then the
adapter loads the same checkpoint from disk and scores the same texts; and `evaluate_model` runs
the local rolling task on the trainer's in-memory model. Writes both sides to OUT.json.
"""

import json
import os
import sys


def _free_port() -> str:
    """A port no one listens on now (a fixed default collided with another suite's run of this worker)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main() -> None:
    run_dir, step, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    overrides = sys.argv[sys.argv.index("--") + 1:]
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or _free_port())
    import torch

    from titan_rw import config as cfgmod
    from titan_rw.eval.adapter import TitanRWLM
    from titan_rw.eval.periodic import evaluate_model
    from titan_rw.loss import IGNORE_INDEX

    cfg = cfgmod.from_args("train_configs/debug_cpu.toml", [*overrides, "--job.dump_folder", run_dir,
                                                            "--checkpoint.enable", "true", "--checkpoint.load_only", "true",
                                                            # the model through TorchTitan's checkpointer; the
                                                            # rest of the training state is not needed here
                                                            "--checkpoint.exclude_from_loading",
                                                            '["dataloader", "optimizer", "lr_scheduler", "train_state"]'])
    trainer = cfg.build()
    assert trainer.checkpointer.load(step=step), "trainer could not load the checkpoint"
    model = trainer.model_parts[0]
    model.eval()

    lm = TitanRWLM(checkpoint=run_dir, max_length=cfg.training.seq_len)
    tok = lm.tok
    texts = [
        "The kernel exposes this interface through sysfs.",
        "Python's standard library includes a module for regular expressions.",
        "A fortune a day keeps the doctor away, or so they say.",
    ]
    # training path: BOS + text as one row each, labels = next tokens (right-padded, -100)
    ids = [tok.encode(t, add_bos=True, add_eos=False) for t in texts]
    T = max(len(x) for x in ids) - 1
    inputs = torch.full((len(ids), T), tok.bos_id, dtype=torch.long)
    labels = torch.full((len(ids), T), IGNORE_INDEX, dtype=torch.long)
    for i, x in enumerate(ids):
        inputs[i, : len(x) - 1] = torch.tensor(x[:-1])
        labels[i, : len(x) - 1] = torch.tensor(x[1:])
    with torch.no_grad():
        losses, _, _ = trainer._per_sample(inputs, labels, {})
        n_valid = (labels != IGNORE_INDEX).sum(dim=1)
    train_sum_nll = (losses.double() * n_valid.double()).tolist()

    from lm_eval.api.instance import Instance

    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts])
    # loglikelihood(context, continuation): the trainer's per-token NLL summed over the continuation
    ctx, cont = "Python's standard library", " includes a module for regular expressions."
    ll = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])[0][0]
    whole = tok.encode(ctx + cont, add_bos=True, add_eos=False)
    n_ctx = len(tok.encode(ctx, add_bos=True, add_eos=False))
    x = torch.tensor([whole[:-1]])
    y = torch.tensor([[IGNORE_INDEX] * (n_ctx - 1) + whole[n_ctx:]])
    with torch.no_grad():
        l2, _, _ = trainer._per_sample(x, y, {})
        n2 = (y != IGNORE_INDEX).sum(dim=1)
    train_cont_nll = float(l2.double()[0] * n2[0])

    in_memory = evaluate_model(model, tok, ["titan_rw_local_ppl"], limit=4, max_length=cfg.training.seq_len)
    from titan_rw.eval.runner import evaluate
    from titan_rw.eval.presets import expand

    from_disk = evaluate(lm, expand("titan_rw_local_ppl"), limit=4)["results"]["titan_rw_local_ppl"]
    json.dump({
        "train_sum_nll": train_sum_nll, "adapter_rolling": rolling,
        "train_cont_nll": train_cont_nll, "adapter_ll": ll,
        "in_memory_bpb": in_memory["eval/titan_rw_local_ppl/bits_per_byte"],
        "from_disk_bpb": from_disk["bits_per_byte,none"],
    }, open(out, "w"))
    trainer.close()


if __name__ == "__main__":
    main()
