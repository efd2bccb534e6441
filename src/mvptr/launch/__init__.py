"""Run GPU-class steps as submitit jobs that survive restarts, preemption and timeouts; see `launcher`."""

from __future__ import annotations

from mvptr.launch.launcher import (
    CLUSTERS,
    JOB_RECORD,
    LaunchError,
    LaunchSettings,
    launch,
    read_job_record,
)

__all__ = ["CLUSTERS", "JOB_RECORD", "LaunchError", "LaunchSettings", "launch", "read_job_record"]
