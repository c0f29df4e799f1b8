"""`python -m titan_rw.train --config FILE [--section.key value ...]`.

Runs as is on one process, or under `torchrun --standalone --nproc_per_node=N -m titan_rw.train ...`
(NCCL on GPUs, gloo on CPU, same code). `train_main(argv)` backs `titan-rw train`; with
`--nproc N` (N > 1, not already under torchrun) it re-launches itself under torchrun.
"""

from __future__ import annotations

import titan_rw  # noqa: F401  (compat patches before torchtitan)

import argparse
import os
import signal
import subprocess
import sys

# Exit code when the run folder's checkpoints do not fit this run (docs/resuming.md): a config
# mismatch, or checkpoints none of which loads. Like a config error: restarting does not help.
EXIT_RESUME_REFUSED = 2
# Exit code of a user error found before (or while) building the run: a config key, a data path,
# input data that cannot be trained on (docs/data.md). One line on stderr, no traceback.
EXIT_USER_ERROR = 2
# Exit code when another live run holds the folder's lock (titan_rw.runlock): nothing was built.
EXIT_FOLDER_IN_USE = 2
USAGE = "titan_rw.train --config FILE [--nproc N] [--section.key value ...]"


def _split(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="titan_rw.train", usage=USAGE, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML run config (train_configs/*.toml)")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (starts torchrun)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--keys", nargs="?", const="", metavar="SECTION",
                   help="list every config key (of one SECTION) with its type and default, then exit")
    if any(a in ("-h", "--help") for a in argv):
        p.epilog = _sections_help()
    return p.parse_known_args(argv)


def _sections_help() -> str:
    from titan_rw import config as cfgmod

    lines = ["config sections (TOML [section] or --section.key value on the command line):"]
    for name in cfgmod.SECTIONS:
        lines.append(f"  [{name}]  {len(cfgmod.section_fields(name))} keys")
    lines.append("every key, its type and default: titan-rw train --keys [SECTION]")
    return "\n".join(lines)


def keys_text(section: str = "") -> str:
    """Each settable key of the sections (or one), with its type and default."""
    from titan_rw import config as cfgmod

    if section and section not in cfgmod.SECTIONS:
        raise cfgmod.ConfigError(f"--keys: unknown section [{section}]; valid sections: {', '.join(cfgmod.SECTIONS)}")
    lines = []
    for name in [section] if section else list(cfgmod.SECTIONS):
        sec = cfgmod.build_section({}, name)
        lines.append(f"[{name}]")
        for key, tp in cfgmod.section_fields(name).items():
            lines.append(f"  {key} = {getattr(sec, key)!r}    ({cfgmod.type_name(tp)})")
    return "\n".join(lines)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _relaunch(nproc: int, argv: list[str]) -> int:
    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    # titan_rw.torchrun: torchrun whose exit code after a signal is 128 + signal (docs/resuming.md)
    cmd = [sys.executable, "-m", "titan_rw.torchrun", "--standalone", f"--nproc_per_node={nproc}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=120",
           "-m", "titan_rw.train", *rest]
    proc = subprocess.Popen(cmd)

    def forward(signum, _frame):  # a signal to this process goes to the launcher, which tells the ranks
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher (same process group)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def train_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import logging

    import torch

    from titan_rw.progress import quiet_console

    quiet_console(logging.getLogger(), cpu=not torch.cuda.is_available())  # building configs logs too
    if "--keys" in argv or any(a.startswith("--keys=") for a in argv):  # no --config needed
        i = next(i for i, a in enumerate(argv) if a == "--keys" or a.startswith("--keys="))
        sec = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv)
                                                              and not argv[i + 1].startswith("-") else "")
        from titan_rw.config import ConfigError

        try:
            print(keys_text(sec))
        except ConfigError as e:
            print(f"titan_rw: {e}", file=sys.stderr)
            return 2
        return 0
    args, overrides = _split(argv)
    relaunch = args.nproc is not None and args.nproc > 1 and not args.check and not _under_torchrun()

    from titan_rw import config as cfgmod

    # with --nproc the config and the data are checked here, once, before torchrun starts the ranks:
    # a user error is one line and exit 2, not one traceback per rank and the launcher's report
    world = args.nproc if (args.check or relaunch) and args.nproc else None
    try:
        config = cfgmod.from_args(args.config, overrides, world_size=world)
        cfgmod.preflight(config)  # the data, before the model is built (docs/data.md)
    except cfgmod.ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same error: say it once
            print(f"titan_rw: config error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if relaunch:
        return _relaunch(args.nproc, argv)
    if args.check:
        print(f"{args.config}: OK")
        return 0
    if "LOCAL_RANK" not in os.environ:  # a plain single process: what torchrun would set
        os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return run(config)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config) -> int:
    """Build the trainer from a `ReweightTrainer.Config` and train (TorchTitan's main, unchanged in
    spirit). Returns the exit code: 0 when the run finished (or the seed checkpoint was written);
    `TrainingStopped.exit_code` when it stopped on purpose after a checkpoint (SIGTERM/SIGUSR1:
    128 + signal by default; too many skipped steps: 3); 2 when another run holds the folder's lock
    (nothing was built). See docs/resuming.md."""
    import torch
    from torchtitan.tools.logging import init_logger, logger

    from titan_rw import compat
    from titan_rw.runlock import RunLockBusy

    init_logger()
    from titan_rw.progress import quiet_console

    quiet_console(logger, cpu=not torch.cuda.is_available())
    compat.log_applied(logger)
    try:
        lock = _take_run_lock(config)  # before anything is built, on every rank
    except RunLockBusy as e:
        if os.environ.get("RANK", "0") == "0":
            print(str(e), file=sys.stderr)
        return EXIT_FOLDER_IN_USE
    try:
        return _run_locked(config)
    finally:
        if lock is not None:
            lock.release()


def _take_run_lock(config):
    """Rank 0 takes `<dump_folder>/run.lock` (titan_rw.runlock); under torchrun it tells the other
    ranks the outcome through the launcher's store, before any process group exists, so that all
    stop when it refuses. Returns the held lock (rank 0) or None; raises RunLockBusy on every rank."""
    from titan_rw.runlock import RunLock, RunLockBusy

    cfg = RunLock.Config(**config.run_values.get("run_lock", {}))
    if not cfg.enable:
        return None
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    store = None
    if world > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from datetime import timedelta

        from torch.distributed import TCPStore

        # torchrun's agent hosts this store for the whole job; the key is per attempt
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=config.comm.init_timeout_seconds))
    key = (f"titan_rw/run_lock/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
           f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    if rank != 0:
        if store is None:  # another launcher: rank 0 alone decides, these ranks learn it at rendezvous
            return None
        verdict = store.get(key).decode()
        if verdict:
            raise RunLockBusy(verdict)
        return None
    lock = cfg.build(config.dump_folder)
    try:
        lock.acquire()
    except RunLockBusy as e:
        if store is not None:
            store.set(key, str(e))
        raise
    except OSError as e:  # the folder was checked at start (config.preflight); it changed since
        msg = (f"titan_rw: cannot write the run lock {lock.path} ({e.strerror or e}); check "
               f"--job.dump_folder {config.dump_folder}")
        if store is not None:
            store.set(key, msg)
        raise RunLockBusy(msg) from None
    if store is not None:
        store.set(key, "")
    return lock


def _run_locked(config) -> int:
    import torch
    from torchtitan.observability import structured_logger as sl
    from torchtitan.tools.logging import logger

    from titan_rw.checkpointing import CheckpointSaveError, ResumeError
    from titan_rw.config import save_run_config
    from titan_rw.data.parquet import DataError
    from titan_rw.faults import TrainingStopped

    import logging

    # A log handler that fails (TorchTitan's structured log on a full disk) must not print a traceback
    # per record: the run's own writers stop it with one line at their next write (docs/resuming.md).
    logging.raiseExceptions = False
    sl.init_structured_logger(source="training", output_dir=config.dump_folder,
                              enable=config.debug.enable_structured_logging)
    trainer = None
    code = 0
    try:
        trainer = config.build()
        if config.checkpoint.create_seed_checkpoint:
            if int(os.environ.get("WORLD_SIZE", "1")) != 1:
                raise ValueError("checkpoint.create_seed_checkpoint needs a single process (no sharding)")
            if not config.checkpoint.enable:
                raise ValueError("checkpoint.create_seed_checkpoint needs checkpoint.enable = true")
            trainer.checkpointer.save(curr_step=0, last_step=True)
            save_run_config(config.dump_folder, config.run_values)
            logger.info("Created seed checkpoint (step-0): runs in this folder start from it")
        else:
            trainer.resume()
            if trainer.rank == 0:  # after the resume check: a refused config never replaces the run's
                save_run_config(config.dump_folder, config.run_values)
            trainer.train()
            try:
                _print_summary(trainer, config)
            except Exception as e:  # noqa: BLE001 - the run is done; a summary must not fail it
                logger.warning(f"titan_rw: no run summary ({type(e).__name__}: {e})")
    except TrainingStopped as e:
        code = e.exit_code
        if str(e):  # a metrics write failure: rank 0 says it, the others stop silently
            print(str(e), file=sys.stderr)
    except ResumeError as e:  # the run folder's checkpoints do not fit this run: nothing was run
        code = EXIT_RESUME_REFUSED
        if os.environ.get("RANK", "0") == "0":
            print(str(e), file=sys.stderr)
    except CheckpointSaveError as e:  # disk full / read-only during a save: one line, the path
        code = 1
        print(str(e), file=sys.stderr)
    except DataError as e:  # input data that the preflight cannot see (it needs tokenizing): one line
        code = EXIT_USER_ERROR
        if trainer is None and os.environ.get("RANK", "0") != "0":
            pass  # while building, every rank reads the same data and finds the same error
        else:
            print(f"titan_rw: data error: {e}", file=sys.stderr)
    except OSError as e:
        from titan_rw.observability.jsonl import write_failure

        if not _is_full_or_readonly(e):
            if trainer is not None:
                trainer.close()
            raise
        code = 1  # e.g. TensorBoard's event file at start: the same one line as the metrics writer's
        print(write_failure(e, os.path.join(config.dump_folder, "metrics.jsonl"), None), file=sys.stderr)
    except BaseException:
        if trainer is not None:
            trainer.close()
        raise
    if trainer is not None:
        trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


def _is_full_or_readonly(e: OSError) -> bool:
    import errno

    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _print_summary(trainer, config) -> None:
    """Rank 0: final loss, where the outputs are, and the next commands (titan_rw.progress.run_summary)."""
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    from titan_rw.progress import run_summary

    rl = getattr(trainer, "run_logger", None)
    path = getattr(rl, "metrics_path", None)
    final = None
    if path and os.path.isfile(path):
        from titan_rw.observability.jsonl import read_metrics

        final = read_metrics(path)[-1]  # the last step's row (a torn last line is ignored)
    ck = getattr(trainer, "checkpointer", None)
    folder = getattr(ck, "folder", None) if getattr(ck, "enable", False) else None
    print(run_summary(config.dump_folder, steps=trainer.step, final=final, checkpoint_folder=folder,
                      tb_dir=getattr(rl, "tb_dir", None), metrics_path=path), flush=True)


def main() -> None:
    sys.exit(train_main())


if __name__ == "__main__":
    main()
