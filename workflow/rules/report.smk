"""Summary rule: the ablation table (rows: ablations, columns: every task metric) and a bar chart per task, from
the MLflow runs of the evaluations (`mvptr compare`); its outputs and the loss curves go into
`snakemake --report`."""


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
        ablations=" ".join(ABLATIONS),
        out="results/summary/{dataset}",
        config=config_args(DATA_KEYS),
    shell:
        "MVPTR_RULE=summarize mvptr compare {params.config} --stage evaluate "
        "--out-dir {params.out} --ablations {params.ablations} > {log} 2>&1 "
        "&& cat {output.markdown} >> {log}"
