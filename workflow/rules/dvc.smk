"""DVC's view of a run at paths that no config hash changes (`mvptr dvc export`): results/dvc/metrics.json (every
task's headline metrics per (method, ablation, seed), flat keys: `dvc metrics show`, `dvc exp show`) and the plot data
under results/dvc/plots/ (loss curves per (method, ablation, stage); the task metrics as a table: `dvc plots diff`).
dvc.yaml declares these, so that `dvc exp run -S configs/default.yaml:seed=3` compares with the run before it.
"""


rule dvc_export:
    input:
        evaluation_outputs(),
        [
            f"{folder}/metrics.json"
            for run in RUNS
            for folder in (stage1_dir(run), stage2_dir(run))
        ],
    output:
        metrics="results/dvc/metrics.json",
        losses=directory("results/dvc/plots/losses"),
        tasks="results/dvc/plots/tasks.json",
    log:
        "results/logs/dvc_export.log",
    conda:
        "../../environment.yml"
    params:
        runs=[
            f"{method}/{ablation}/seed{seed}={stage1_dir((method, ablation, seed))}"
            for method, ablation, seed in RUNS
        ],
        # results/<dataset>: every input lies under it
        results=lambda wildcards, input: "/".join(Path(input[0]).parts[:2]),
    shell:
        "mvptr dvc export --results {params.results:q} --runs {params.runs:q} --out-dir results/dvc > {log:q} 2>&1"
