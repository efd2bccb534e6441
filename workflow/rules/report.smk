"""Summary rule: the comparison table (rows: (method, ablation), columns: every task's headline metrics) and a
bar chart per task, from the MLflow runs of the evaluations (`mvptr compare`); its outputs and the loss curves go
into `snakemake --report`."""


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
        charts=report(
            expand("results/summary/{{dataset}}/{task}.png", task=EVAL_TASKS),
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
        runs=" ".join(f"{method}/{ablation}" for method, ablation in RUNS),
        methods=" ".join(dict.fromkeys(method for method, _ in RUNS)),
        out="results/summary/{dataset}",
        config=config_args(DATA_KEYS),
    shell:
        "MVPTR_RULE=summarize mvptr compare {params.config} --stage evaluate "
        "--out-dir {params.out} --runs {params.runs} --methods {params.methods} > {log} 2>&1 "
        "&& cat {output.markdown} >> {log}"
