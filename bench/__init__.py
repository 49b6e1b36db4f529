"""fused_tau benchmarks: ``python -m bench`` from a checkout (see bench/__main__.py)."""
