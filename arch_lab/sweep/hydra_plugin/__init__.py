"""Installed as `hydra_plugins.arch_lab_optuna_sweeper` (see pyproject's package-dir).

Hydra instantiates sweepers only from the `hydra_plugins` namespace (hydra.core.plugins.Plugins._instantiate);
this subclass puts arch_lab's Optuna sweeper there, and importing it registers `hydra/sweeper=arch_lab_optuna`.
"""
from arch_lab.sweep.optuna_sweeper import OptunaSweeper


class ArchLabOptunaSweeper(OptunaSweeper):
    """arch_lab.sweep.optuna_sweeper.OptunaSweeper under the name Hydra accepts."""
