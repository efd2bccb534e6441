"""Summary rule: the comparison table (rows: (method, ablation), columns: every task's headline metrics, means
over the seeds), the seed statistics (mean +- std, paired differences with their 95% intervals), a bar chart per
task and the narrow headline table `make demo` prints, built from the evaluation JSON files the rule
depends on (`mvptr compare --evaluations`; MLflow is where to browse the runs, not an input); its outputs and the
loss curves go into `snakemake --report`."""


rule summarize:
    input:
        evaluation_outputs(),
    output:
        table=report(
            "results/summary/{dataset}/ablations.csv",
            caption="../report/ablations.rst",
            category="Ablations",
        ),
        markdown="results/summary/{dataset}/ablations.md",
        metrics="results/summary/{dataset}/ablations.json",
        headline="results/summary/{dataset}/headline.md",
        statistics="results/summary/{dataset}/statistics.md",
        statistics_json="results/summary/{dataset}/statistics.json",
        charts=report(
            expand("results/summary/{{dataset}}/{task}.png", task=SUMMARY_TASKS),
            caption="../report/charts.rst",
            category="Ablations",
        ),
    log:
        "results/logs/summarize/{dataset}.log",
    benchmark:
        "results/benchmarks/rules/summarize/{dataset}.tsv"
    conda:
        "../../environment.yml"
    params:
        runs=[f"{method}/{ablation}" for method, ablation in PAIRS],
        methods=list(dict.fromkeys(method for method, _ in PAIRS)),
        out="results/summary/{dataset}",
    shell:
        "MVPTR_RULE=summarize mvptr compare --evaluations {input:q} "
        "--out-dir {params.out:q} --runs {params.runs:q} --methods {params.methods:q} > {log:q} 2>&1 "
        "&& cat {output.headline:q} {output.statistics:q} >> {log:q}"
