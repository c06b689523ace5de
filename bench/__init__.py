"""Benchmarks of hf_oto: scripts that print tables (``python bench/<name>.py``); ``bench.tasks`` and
``bench.methods`` hold the tasks and the baseline methods of the comparison (``bench/compare.py``)."""
