"""Data rules: generate the synthetic world or check a user's COCO-format dataset."""


rule prepare_data:
    output:
        directory("resources/datasets/{dataset}"),
    log:
        "results/logs/prepare_data/{dataset}.log",
    benchmark:
        "results/benchmarks/rules/prepare_data/{dataset}.tsv"
    conda:
        "../../environment.yml"
    params:
        config=config_args(DATA_KEYS),
    shell:
        "mvptr data prepare --out {output} {params.config} > {log} 2>&1"
