"""Routing statistics: per-token traces, per-layer expert counts, the project's trace/counts file
formats, and readers for the public routing data sets (see docs/trace-format.md)."""

from prism_moe.stats.readers import UnsafeFileError, restricted_pickle_load
from prism_moe.stats.trace import (
    ExpertCounts,
    RoutingTrace,
    TraceRecorder,
    TraceSequence,
    load_counts,
    load_trace,
    save_counts,
    save_trace,
)
from prism_moe.stats.workload import (
    Workload,
    embedded_workloads,
    esft_domains,
    find_data_dir,
    list_workloads,
    load_prompts,
    load_workload,
    resolve_data_dir,
    stack_counts,
    user_data_dir,
)

__all__ = [
    "ExpertCounts",
    "RoutingTrace",
    "TraceRecorder",
    "TraceSequence",
    "UnsafeFileError",
    "Workload",
    "embedded_workloads",
    "esft_domains",
    "find_data_dir",
    "list_workloads",
    "load_counts",
    "load_prompts",
    "load_trace",
    "load_workload",
    "resolve_data_dir",
    "restricted_pickle_load",
    "save_counts",
    "save_trace",
    "stack_counts",
    "user_data_dir",
]
