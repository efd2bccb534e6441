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
    stage2 = json.loads(next(workdir.glob("results/*/mvptr/full/seed0/pretrain_stage2/metrics.json")).read_text())
    return untimed({"concepts": json.loads(next(workdir.glob("results/*/concepts/concept_quality.json")).read_text()),
                    "backbone": json.loads(next(workdir.glob("results/*/regions/backbone_metrics.json")).read_text()),
                    "stage1": stage1["history"], "stage2": stage2["history"],
                    "zero_shot": stage2["zero_shot"]["recalls"],
                    "evaluate": {p.stem: json.loads(p.read_text())["splits"]
                                 for p in workdir.glob("results/*/mvptr/full/seed0/evaluate/*.json")}})


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def sacct_names(job_ids: list[str]) -> dict[str, str]:
    """Each allocation's job name (submitit names a trainer by its rule; the plugin names rule jobs by a UUID)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobID,JobName", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def test_slurm_run_is_accounted_and_equals_the_local_run(slurm: None, tmp_path: Path):
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    # MVPTR's full run only: its 7 trainer jobs share the one fake GPU (more methods would only queue longer).
    config = [item if not item.startswith("methods=") else "methods=[mvptr]" for item in FAST]
    assert config != FAST
    # The local trainers with the SLURM profile's torch threads (launch.yaml: 2): other threads, other float bits.
    proc = snakemake("--cores", "2", "--workflow-profile", str(ROOT / "workflow/profiles/default"),
                     "--config", *config, "launch={cpus_per_task: 2}", workdir=local, timeout=900)
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
    assert len(rule_jobs) >= 4 and set(states.values()) == {"COMPLETED"}, states
    # One allocation per GPU step: the GPU rules ran on the head (Snakemake's "localrule"), so their trainer
    # jobs are the only allocations that hold a GPU, one each, and no rule job waited beside them.
    out = proc.stdout + proc.stderr
    gpu_rules = {"pretrain_stage1", "pretrain_stage2", *(f"evaluate_{t}" for t in ("retrieval", "vqa", "ve", "rec",
                                                                                    "nlvr2"))}
    assert set(re.findall(r"^localrule (\w+):", out, re.M)) - {"all"} == gpu_rules  # `all` is always local
    assert not gpu_rules & set(re.findall(r"^rule (\w+):", out, re.M))
    # The test cluster's accounting does not track gres/gpu (AccountingStorageTRES), so the GPUs are read from
    # each trainer's sbatch script; sacct names the allocations: one per GPU step, named by its rule.
    names = sacct_names(rule_jobs + [job["job_id"] for job in trainer_jobs])
    assert sorted(names[job["job_id"]] for job in trainer_jobs) == sorted(gpu_rules), names
    assert not gpu_rules & {names[job] for job in rule_jobs}, names
    for job in trainer_jobs:
        script = next(Path(job["folder"]).glob("*submission.sh")).read_text()
        assert "#SBATCH --gpus-per-node=1" in script, job

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


def test_a_requeued_trainer_resumes_at_the_step_it_was_signalled(slurm: None, artifacts, tmp_path: Path):
    """`scancel --signal=USR2` (what SLURM sends before a preemption or the time limit) to a running trainer
    job: it writes its checkpoint at that step, submitit requeues it (`scontrol requeue`, the same job id), and the
    requeued job resumes at that step, not at the last periodic checkpoint. Extra sbatch options from
    launch.slurm_extra reach the job's script."""
    ckpt, job, out = tmp_path / "ckpt", tmp_path / "job", tmp_path / "out"
    cmd = [str(Path(os.sys.executable)), "-m", "mvptr.cli", "pretrain", "stage", "--stage", "1",
           *(f"--{k}={artifacts[k]}" for k in ("dataset", "concepts", "vocab", "regions")), f"--ckpt-dir={ckpt}",
           f"--job-dir={job}", f"--out={out}", "model.hidden_size=32", "model.num_text_layers=1",
           "model.num_visual_layers=1", "model.num_cross_layers=1", "model.num_attention_heads=2",
           "model.intermediate_size=64", "pretrain.stage1.batch_size=8", "pretrain.stage1.steps=300",
           "pretrain.log_every=1", "pretrain.checkpoint_every=100000", "launch.cluster=slurm",
           "launch.gpus_per_node=1", "launch.cpus_per_task=1", "launch.timeout_min=10",
           "launch.slurm_extra=--comment=mvptr-requeue-test"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, job_id = [], None
    for line in proc.stdout:  # the launcher forwards the trainer's log lines
        lines.append(line)
        if "stage 1 step 5/" in line:
            job_id = json.loads((job / "job.json").read_text())["job_id"]
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
            break
    rest, _ = proc.communicate(timeout=600)
    output = "".join(lines) + rest
    assert proc.returncode == 0 and job_id, output[-3000:]
    signalled = [int(m) for m in re.findall(r"signal SIGUSR2 at step (\d+): checkpoint written", output)]
    resumed = [int(m) for m in re.findall(r"stage 1: resumed at step (\d+)", output)]
    assert len(signalled) == 1 and signalled == resumed and 5 <= signalled[0] < 300, output[-3000:]
    assert json.loads((job / "job.json").read_text())["job_id"] == job_id  # requeued, not resubmitted
    scripts = list(job.rglob("*submission.sh"))
    assert scripts and "#SBATCH --comment=mvptr-requeue-test" in scripts[0].read_text()


def test_an_scontrol_requeue_of_a_running_trainer_resumes_in_one_mlflow_run(slurm: None, artifacts, tmp_path: Path):
    """An administrator's `scontrol requeue` (no warning signal: SLURM stops the job and queues it again under
    the same id): the requeued trainer resumes from its last periodic checkpoint, the launcher waits for it
    instead of submitting another job, and the stage stays one MLflow run holding every step's loss."""
    from mlflow import MlflowClient

    ckpt, job, out = tmp_path / "ckpt", tmp_path / "job", tmp_path / "out"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [str(Path(os.sys.executable)), "-m", "mvptr.cli", "pretrain", "stage", "--stage", "1",
           *(f"--{k}={artifacts[k]}" for k in ("dataset", "concepts", "vocab", "regions")), f"--ckpt-dir={ckpt}",
           f"--job-dir={job}", f"--out={out}", "model.hidden_size=32", "model.num_text_layers=1",
           "model.num_visual_layers=1", "model.num_cross_layers=1", "model.num_attention_heads=2",
           "model.intermediate_size=64", "pretrain.stage1.batch_size=8", "pretrain.stage1.steps=1000",
           "pretrain.log_every=1", "pretrain.checkpoint_every=20", "launch.cluster=slurm",
           "launch.gpus_per_node=1", "launch.cpus_per_task=1", "launch.timeout_min=10"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": store})
    lines, job_id = [], None
    for line in proc.stdout:
        lines.append(line)
        if "stage 1 step 30/" in line:
            job_id = json.loads((job / "job.json").read_text())["job_id"]
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            break
    # A requeued job may start again only after a delay (2 minutes); an administrator would release it now.
    for _ in range(600):
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if state.strip() == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            break
        subprocess.run(["sleep", "0.2"])
    rest, _ = proc.communicate(timeout=600)
    output = "".join(lines) + rest
    assert proc.returncode == 0 and job_id, output[-3000:]
    resumed = [int(m) for m in re.findall(r"stage 1: resumed at step (\d+)", output)]
    # SLURM kills the job KillWait seconds after its SIGTERM (submitit lets the step loop run on until then)
    assert len(resumed) == 1 and resumed[0] % 20 == 0 and 20 <= resumed[0] < 1000, output[-3000:]
    record = json.loads((job / "job.json").read_text())
    assert record["job_id"] == job_id and record["submissions"] == 1, record  # requeued, not resubmitted
    client = MlflowClient(store)
    runs = [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])
            if run.info.run_name.endswith("pretrain_stage1/pretrain")]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
    losses = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert losses == set(range(1, 1001)), sorted(set(range(1, 1001)) - losses)[:10]
