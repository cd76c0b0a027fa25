"""The end-to-end benchmark (`liftavatar bench`) and the demo (`liftavatar demo`): the paper's protocol on
held-out synthetic subjects, its tables, curve, plots and HTML report."""

from liftavatar.bench.protocol import BenchConfig, demo_config, full_config, quick_config, run_bench

__all__ = ["BenchConfig", "demo_config", "full_config", "quick_config", "run_bench"]
