"""Benchmark helpers shared by ``experiments/bench/*`` (DESIGN.md section 6)."""

from jaxsparse.bench.devices import rerun_on_emulated_devices
from jaxsparse.bench.progress import cases
from jaxsparse.bench.timing import (Timing, markdown_table, matmul_peak_flops, time_fn,
                                    time_interleaved, write_results)

__all__ = ["Timing", "cases", "markdown_table", "matmul_peak_flops", "rerun_on_emulated_devices", "time_fn",
           "time_interleaved", "write_results"]
