"""`python -m titan_rw.torchrun [torchrun arguments]`: torch's `torchrun`, with the exit code of a run
stopped by a signal made what docs/resuming.md says (128 + signal: 143 for TERM, 138 for USR1).

torch 2.13's launcher, when it receives a signal it handles (`--signals-to-handle`; Slurm and users
signal the launcher), forwards it to the workers, waits `--shutdown-timeout` seconds for them (they
save a checkpoint and exit 143 / 138) and then exits 1, like any failure; when the workers alone
were signalled and exit 143 / 138, it also exits 1 (a failed child). Here:

- the launcher stopped by a signal S exits 128 + S, after the same forwarding and wait;
- every failed worker exiting with the same 128 + TERM or 128 + USR1 code: the launcher exits with it;
- a failed worker exiting 2 (a user error: a config key, the data, the run folder in use by another
  run, a refused resume, said in one line by rank 0), the others 2 too or stopped by the
  launcher's SIGTERM / SIGKILL: the launcher exits 2, without torchrun's error report;
- anything else is unchanged (0, or 1 with torchrun's error report).

Everything else is torchrun itself, arguments included.
"""

from __future__ import annotations

import signal
import sys

_SIGNAL_CODES = (128 + signal.SIGTERM, 128 + signal.SIGUSR1)
_USER_ERROR = 2  # titan_rw.train's EXIT_USER_ERROR / EXIT_FOLDER_IN_USE / EXIT_RESUME_REFUSED


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(argv)
    except SignalException as e:  # the launcher itself was signalled: the workers had their chance
        sig = int(e.sigval)
        print(f"titan_rw.torchrun: stopped by {signal.Signals(sig).name}; exit code {128 + sig}", file=sys.stderr)
        return 128 + sig
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if len(codes) == 1 and (code := next(iter(codes))) in _SIGNAL_CODES:
            return code  # the workers stopped on a signal, after their checkpoint
        if _USER_ERROR in codes and codes <= {_USER_ERROR, -signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM}:
            return _USER_ERROR  # rank 0 said why in one line; the others exited 2 too or were stopped
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
