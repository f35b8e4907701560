"""The simulation side of flmnist's warm executor: a forked child per simulation run.

A local SuperLink (``flower-superlink --simulation``) hands each submitted run to its SuperExec,
which in Flower 1.41 starts a new ``flwr-simulation`` process: a new Python that imports Flower,
PyTorch and the app before the ServerApp's first line, 3.1-3.5 s on 2 cores for every job of a
sweep. With the SuperLink in ``--isolation process`` and ``flmnist-warm-executor --task-type
simulation`` beside it, those imports are done once; each run's child runs what
``flwr-simulation --token`` runs (Flower 1.41.0's ``flwr_simulation``: its output mirrored to the
run's log, then ``run_simulation_process``), and loads the ServerApp and ClientApp from the bundle
the SuperLink received, as that process would. A sweep (:mod:`flmnist.launch.sweep_link`) starts
both for its jobs.

A child that ends its run ends it through Flower's own exit handler (the run's status, the last
of its log). One that exits otherwise (killed by a signal, or failing before Flower's handler is
in place) cannot: the executor then reports the run failed with the task's token, so that ``flwr
run`` ends at once instead of after Flower's task expiry (about a minute without the child's
heartbeats). The SuperLink refuses the report for a run that has ended already. (``flmnist``
stops a run's processes as soon as its results are written, often before Flower's handler has
reported; the run's status in the private SuperLink is then "failed", which nothing reads.)
"""

from __future__ import annotations

import logging
import os
import time
from typing import NoReturn

from flmnist.flower_patches import warm_child
from flmnist.flower_patches.warm_child import report

STARTED = b"S"  # child -> executor: Flower's simulation process code is about to run

TASK_TYPE = "flwr-simulation"  # Flower's TaskType.SIMULATION
# Imported once by an executor for simulation runs: the ClientApp side's and, besides, what the
# ServerApp side and flmnist's server use (libraries only, never the app).
# Not torch._dynamo: a local simulation trains on the CPU (training.CpuSGD needs none), and these
# imports are a run's critical path (launch/head_start.py); a DP-SGD run imports it in its child.
PRELOAD = (*(m for m in warm_child.DEFAULT_PRELOAD if m != "torch._dynamo"), "flwr.simulation.app",
           "flwr.serverapp", "hydra", "omegaconf", "matplotlib.pyplot")


def child_main(settings, certificates: bytes | None, task_id: int, token: str, report_fd: int,
               forked: float) -> NoReturn:
    """Runs in the forked child: Flower's ``flwr_simulation`` for one run; never returns."""
    def task() -> None:
        from queue import Queue

        from flwr.simulation import app as flower
        from flwr.supercore import log as flower_log
        from flwr.supercore.logger import mirror_output_to_queue, restore_output

        install = flower.install_from_fab  # every job of a sweep ships the same bundle: unpacked once
        flower.install_from_fab = lambda *a, **k: warm_child._installed_path(*a, **k) or install(*a, **k)
        warm_child.LOG.info("task %d: simulation child ready %.2f s after the fork", task_id,
                            time.monotonic() - forked)
        log_queue: Queue = Queue()
        mirror_output_to_queue(log_queue)  # from here on, what the run prints goes to the run's log
        flower_log(logging.INFO, "Starting Flower Simulation")  # as flwr-simulation's first line
        report(report_fd, STARTED)
        try:
            flower.run_simulation_process(runtime_api_address=settings.runtime_api_address, log_queue=log_queue,
                                          token=token, insecure=settings.insecure, certificates=certificates,
                                          parent_pid=None, runtime_dependency_install=False)
        finally:
            restore_output()

    warm_child.in_child(task)


def finished(client, child, status: int, how: str) -> None:
    """The executor's end of a simulation child (``client``: a Runtime API client with the task's
    token, closed here): logged; killed by a signal, its run is reported failed."""
    import httpx
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest

    try:
        if os.waitstatus_to_exitcode(status) == 0 and child.killed is None:  # Flower's exit handler ran
            warm_child.LOG.info("task %d (run %d): simulation child %d %s", child.task_id, child.run_id, child.pid, how)
            return
        started = STARTED in dict(warm_child.frames(child.received))
        client.PushTaskOutput(PushTaskOutputRequest(
            sub_status=SubStatus.FAILED, details=f"simulation process {how} (flmnist warm executor)"))
        warm_child.LOG.warning("task %d (run %d): simulation child %d %s%s; its run is reported failed",
                               child.task_id, child.run_id, child.pid, how, "" if started else " before the run started")
    except httpx.HTTPError:  # the run had ended: its own status stands
        warm_child.LOG.info("task %d (run %d): simulation child %d %s, after its run ended", child.task_id,
                            child.run_id, child.pid, how)
    finally:
        client.close()
