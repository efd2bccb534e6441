"""The whole workflow on a real SLURM cluster (`workflow/profiles/slurm`), against the same run done locally.

Every rule is a SLURM job; the pre-training stages are SLURM jobs that submit their trainer through submitit to
the same cluster (one fake GPU). The test checks that the jobs are in `sacct` and that the results equal those
of the local run (CPU training is deterministic at a fixed thread count). It needs root for the single-node
cluster (`../shared/slurm/slurm_up.sh`, see conftest.py) and skips, saying why, otherwise. About 2-3 minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from conftest import ROOT
from test_workflow import FAST, snakemake

# Wall-clock measurements inside the result files: the two runs cannot agree on them.
TIMINGS = {"samples_per_s", "itm_seconds", "seconds"}


def untimed(value: object) -> object:
    """`value` with every timing key removed, at any depth."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


SLURM_PROFILE = ["--profile", str(ROOT / "workflow/profiles/slurm"),
                 "--default-resources", "slurm_account=testacct", "mem_mb=1000", "runtime=30"]


def results(workdir: Path) -> dict[str, object]:
    """What the two runs must agree on: concept quality, backbone accuracy, both stages' losses, every task's
    metrics (times left out)."""
    stage1 = json.loads(next(workdir.glob("results/*/pretrain/stage1-*/metrics.json")).read_text())
    stage2 = json.loads(next(workdir.glob("results/*/mvptr/full/pretrain_stage2/metrics.json")).read_text())
    return untimed({"concepts": json.loads(next(workdir.glob("results/*/concepts/concept_quality.json")).read_text()),
                    "backbone": json.loads(next(workdir.glob("results/*/regions/backbone_metrics.json")).read_text()),
                    "stage1": stage1["history"], "stage2": stage2["history"],
                    "zero_shot": stage2["zero_shot"]["recalls"],
                    "evaluate": {p.stem: json.loads(p.read_text())["splits"]
                                 for p in workdir.glob("results/*/mvptr/full/evaluate/*.json")}})


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def test_slurm_run_is_accounted_and_equals_the_local_run(slurm: None, tmp_path: Path):
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    # MVPTR's full run only: its 7 trainer jobs share the one fake GPU, and its 7 waiting rule jobs (one CPU each)
    # leave the test cluster's 8 CPUs room for a trainer (both methods' 10 evaluation rules would hold them all;
    # a rule job holding an allocation while its trainer waits is issue [5/7]).
    config = [item if not item.startswith("methods=") else "methods=[mvptr]" for item in FAST]
    assert config != FAST
    proc = snakemake("--cores", "2", "--workflow-profile", str(ROOT / "workflow/profiles/default"),
                     "--config", *config, workdir=local, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = snakemake(*SLURM_PROFILE, "--config", *config, workdir=cluster, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Rule jobs: Snakemake says "submitted with SLURM jobid N" (the plugin deletes the logs of successful jobs);
    # trainer jobs: the launcher's job.json.
    rule_jobs = re.findall(r"SLURM jobid (\d+)", proc.stdout + proc.stderr)
    trainer_jobs = [json.loads(p.read_text()) for p in cluster.glob("results/logs/**/*.submitit/job.json")]
    # two pre-training stages and five downstream tasks, each its own submitit job on SLURM
    assert len(trainer_jobs) == 7 and all(job["cluster"] == "slurm" for job in trainer_jobs), trainer_jobs
    states = sacct_states(rule_jobs + [job["job_id"] for job in trainer_jobs])
    assert len(rule_jobs) >= 7 and set(states.values()) == {"COMPLETED"}, states

    assert results(cluster) == results(local)


def test_a_bare_profile_name_works_after_the_one_time_install(tmp_path: Path):
    home = tmp_path / "home"
    subprocess.run(["make", "-s", "slurm-profile", f"HOME={home}"], cwd=ROOT, check=True, capture_output=True)
    assert (home / ".config/snakemake/slurm/config.yaml").is_file()
    env_home = {**os.environ, "HOME": str(home)}
    proc = subprocess.run([str(Path(os.sys.executable).parent / "snakemake"), "--profile", "slurm", "-n",
                           "--config", *FAST, "--directory", str(tmp_path / "work")], cwd=ROOT, env=env_home,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrain_stage2" in proc.stdout
