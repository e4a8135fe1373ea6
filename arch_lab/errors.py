"""How the lab's commands end on an error whose message says it all (a bad config value, a diverged loss)."""
from __future__ import annotations

import logging
import os
from typing import NoReturn


def exit_with_message(log: logging.Logger, error: BaseException) -> NoReturn:
    """Log `error`'s message as the command's last line and exit 1, Hydra's status for its own config errors: a
    traceback would bury the key and what it allows. HYDRA_FULL_ERROR=1 re-raises it, traceback and all."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    log.error("%s", error)
    raise SystemExit(1) from None
