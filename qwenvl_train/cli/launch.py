"""`python -m qwenvl_train.cli.launch [torchrun arguments]`: torchrun, with a one-line
report when a worker fails (scripts/launch_torchrun.sh runs it).

torchrun ends a failed job by raising `ChildFailedError`: a traceback of torchrun itself
and a box of details, printed after the failed rank's own message. qwenvl-train's workers
already said what went wrong (one message per rank, cli/failures.py), so this prints one
line naming the rank whose failure came first and exits with its exit code (2: the launch
was refused; 1: the run failed; 128+N: killed by signal N). Signals reach torchrun as
before: it forwards them to the workers and reaps them.
"""

from __future__ import annotations

import sys


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            how, code = f"was killed by {failure.signal_name()}", 128 - failure.exitcode
        else:
            how, code = f"exited with code {failure.exitcode}", failure.exitcode or 1
        print(f"launch: rank {rank} (pid {failure.pid}) {how} first; its message is above",
              file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
