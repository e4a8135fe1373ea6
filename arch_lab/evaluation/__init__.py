"""Evaluation: local commonsense tasks (commonsense), the lm-evaluation-harness adapter
(lm_eval_adapter) and the analysis figures (plots).

Submodules are imported directly so that lm-eval and matplotlib load only where they are used.
"""
