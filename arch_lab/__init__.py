"""arch_lab: Hydra/Lightning/MLflow/Optuna lab for hybrid-head (attention + SSM) language models."""
