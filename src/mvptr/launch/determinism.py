"""The `launch.deterministic` switch: the same weights, bit for bit, from the same config on any x86-64 CPU.

Why: without it a run is bit-for-bit reproducible only on the same machine with the same thread count. torch
picks its CPU kernels by what the processor offers (ATen's vectorised kernels: DEFAULT, AVX2 or AVX512; oneDNN's
JIT kernels up to AVX512/AMX), and each choice rounds differently: on one AVX512 EPYC, 30 steps of a small stage
one gave four different weight files with ATen at AVX2 instead of AVX512, with oneDNN capped at AVX2, and with 1
instead of 2 threads (measured with `benchmarks/bench_deterministic.py`). The switch pins every choice to the
kernels every x86-64 CPU has: ATen's scalar DEFAULT kernels, oneDNN's SSE4.1 ones, MKL's conditional numerical
reproducibility mode (`MKL_CBWR=COMPATIBLE`), and `torch.use_deterministic_algorithms`. These are read when the
libraries first compute, so the launcher puts them into the job's environment at submission (a local process and
sbatch inherit it) and the job checks, before training, that they took effect.

What stays outside it: the thread count (`launch.cpus_per_task`, part of the config, so equal configs agree), and
GPUs (cuBLAS and cuDNN differ between GPU models; on one model the switch also makes CUDA deterministic, with
`CUBLAS_WORKSPACE_CONFIG`). Its cost is measured by `benchmarks/bench_deterministic.py` (README, "Reproducibility").

Use: `launch.deterministic=true` on the command line or in a config.
"""

from __future__ import annotations

PINNED_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "default",  # ATen's scalar kernels, whatever the CPU offers
    "ONEDNN_MAX_CPU_ISA": "SSE41",  # oneDNN's JIT kernels that every x86-64 CPU runs
    "MKL_CBWR": "COMPATIBLE",  # MKL's code path that gives the same results on every x86 CPU
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # needed by torch.use_deterministic_algorithms on CUDA
}


def enter_deterministic_job() -> None:
    """Inside the job, before any computation: deterministic algorithms, and a check that the kernels are pinned
    (an environment set too late, e.g. after torch already computed in this process, would silently not be)."""
    import torch

    torch.use_deterministic_algorithms(True)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":
        raise RuntimeError(f"launch.deterministic: torch already runs its {capability} CPU kernels in this process; "
                           f"the job must start with ATEN_CPU_CAPABILITY=default in its environment")
