"""What measures the product, apart from it: run these by path, e.g. ``python benchmarks/bench.py``."""
