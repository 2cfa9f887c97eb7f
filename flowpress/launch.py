"""`flowpress quantize --nproc-per-node N`: the run on N processes of this host through torch's
elastic launcher (what torchrun runs), keeping flowpress's exit codes and one-line errors, which
torchrun itself replaces by its own exit 1 and a traceback.  Several hosts: torchrun (docs/distributed.md)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

from flowpress.errors import FlowpressError

LAUNCHED = "FLOWPRESS_LAUNCHED"  # set in the ranks this launcher starts: a rank stopped for another's fault is silent
STOPPED = 75  # ... and exits with this code, which the launcher reads as "stopped", never as the run's verdict


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m flowpress *argv` as `nproc` ranks of one torch.distributed world (gloo on the
    CPU, c10d rendezvous on a free local port; each rank gets cores / nproc threads unless
    OMP_NUM_THREADS says otherwise).  Returns rank 0's exit code when only rank 0 failed (a failed
    gate is 1), else 2, with one line for a rank killed by a signal (the others say their own)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise FlowpressError(f"--nproc-per-node {nproc}: give 1 or more processes")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its own account of a failure
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ[LAUNCHED] = "1"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "flowpress", *argv)
    except ChildFailedError as err:
        codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
        exited = {rank: code for rank, code in codes.items() if code > 0 and code != STOPPED}  # each said why
        if exited:
            return exited[0] if set(exited) == {0} else 2  # rank 0 alone: its verdict (gate 1, parity 3, error 2)
        # a rank killed by a signal other than the SIGTERM the launcher stops the others with, else any
        killed = {rank: -code for rank, code in codes.items() if code < 0}
        if not killed:
            print(
                f"flowpress: error: the {nproc} ranks stopped: a collective failed or timed out "
                f"(FLOWPRESS_DIST_TIMEOUT_S); the run directory was not written",
                file=sys.stderr,
            )
            return 2
        rank, number = min(({r: n for r, n in killed.items() if n != signal.SIGTERM} or killed).items())
        print(
            f"flowpress: error: rank {rank} of {nproc} was killed by {signal.Signals(number).name}; every rank "
            "stopped and the run directory was not written; rerun the command",
            file=sys.stderr,
        )
        return 2
    return 0
