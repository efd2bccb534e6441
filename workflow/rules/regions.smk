"""Region rule: train the region backbone and write one region store per split (features, boxes, tags)."""


rule extract_region_features:
    input:
        "resources/datasets/{dataset}",
    output:
        # One {split}.h5 per split the dataset has (a user's dataset may have train only), the backbone's
        # weights and metrics, and skipped.json: a folder, written by the step through temporary names.
        directory("results/{dataset}/regions"),
    log:
        "results/logs/extract_region_features/{dataset}.log",
    benchmark:
        "results/benchmarks/rules/extract_region_features/{dataset}.tsv"
    priority: 1
    conda:
        "../../environment.yml"
    threads: 2
    params:
        config=config_args(REGION_KEYS),
    shell:
        "MVPTR_RULE=extract_region_features OMP_NUM_THREADS={threads} mvptr regions extract "
        "--dataset {input:q} --out {output:q} {params.config} > {log:q} 2>&1"
