"""How the lab's commands end on an error whose message says it all (a bad config value, a diverged loss)."""
from __future__ import annotations

import logging
import os
from typing import NoReturn

from hydra.errors import CompactHydraException


class MultirunJobError(CompactHydraException):
    """A job of a plain multirun (`-m` without hparams_search) that failed on its config or diverged. Hydra prints a
    CompactHydraException's message alone, with no traceback, when it stops the multirun after the last job."""


def exit_with_message(log: logging.Logger, error: BaseException) -> NoReturn:
    """Log `error`'s message as the command's last line and exit 1, Hydra's status for its own config errors: a
    traceback would bury the key and what it allows. HYDRA_FULL_ERROR=1 re-raises it, traceback and all."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    log.error("%s", error)
    raise SystemExit(1) from None


def failed_job(log: logging.Logger, error: BaseException) -> BaseException:
    """Log a multirun job's failure as one line, and return the error that stops the multirun once every job has run
    (Hydra's launcher keeps a job's exception until then, and names the job's overrides); HYDRA_FULL_ERROR=1 gets
    `error` itself, traceback and all."""
    from hydra.core.hydra_config import HydraConfig

    message = f"job {HydraConfig.get().job.num} failed: {error}"
    log.error("%s", message)
    return error if os.environ.get("HYDRA_FULL_ERROR") == "1" else MultirunJobError(message)
