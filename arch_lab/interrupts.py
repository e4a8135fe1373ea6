"""Ctrl-C / SIGTERM during a run: stop at the next step boundary (training) or after the current evaluation
stage, instead of mid-write.

A KeyboardInterrupt raised inside an MLflow SQLite write can leave the store locked, so the first signal only asks
the run to stop at the next boundary; the run then ends KILLED. A second signal interrupts at once.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from typing import Iterator

import lightning as L

log = logging.getLogger(__name__)


class StopRequested(L.Callback):
    def __init__(self) -> None:
        self.signal: int | None = None
        self.peer_signal = False
        self.stage = "step"  # what the run finishes before it stops; the run calls raise_if_requested after each

    def request(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.signal = signum
        log.warning("signal %d: stopping after this %s (send it again to abort at once)", signum, self.stage)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        stop = self.signal is not None
        if trainer.world_size > 1:
            # Data parallel: all ranks stop after the same step, whichever got the signal (a rank that went on
            # would wait forever in its next collective).
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if stop and self.signal is None:
                self.peer_signal = True
        if stop:
            trainer.should_stop = True

    def raise_if_requested(self) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"signal {self.signal}")
        if self.peer_signal:
            raise KeyboardInterrupt("another rank was signalled")


class InterruptedBeforeRun(KeyboardInterrupt):
    """Ctrl-C while a run checked its inputs, before its MLflow run opened: nothing was logged."""


def is_interrupt(error: BaseException) -> bool:
    """Ctrl-C or SIGTERM, also as Lightning reports them from inside fit: a SIGTERMException, or its exit(1) while
    handling a KeyboardInterrupt (a second Ctrl-C); any other SystemExit is a program's own exit."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(error, (KeyboardInterrupt, SIGTERMException)) or (
        isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt))


def interrupt_exit_status(stop: BaseException) -> int:
    """The shell's exit status for what stopped a run: 143 for SIGTERM (Lightning turns one in fit into
    SIGTERMException), else 130 (Ctrl-C; a second one in fit becomes Lightning's exit(1))."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    sigterm = isinstance(stop, SIGTERMException) or any(s in str(stop) for s in ("signal 15", "SIGTERM"))
    return 143 if sigterm else 130


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequested]:
    stopper = StopRequested()
    previous = {s: signal.signal(s, stopper.request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopper
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
