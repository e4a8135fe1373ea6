"""arch_lab.bench: throughput and cache benchmark (`python -m arch_lab.bench`, config conf/bench.yaml).

measure.py times real inference and training code (with the paper's halve-the-batch-on-out-of-memory rule),
flops.py holds the analytic FLOPs and decode byte counts, hf_llama.py runs Hugging Face `generate` on the same
weights for Llama-style configs, report.py formats and stores the results.
"""
