"""Concept rules: parse captions into scene-graph concepts, score the parser, build the concept vocabulary, and
parse the downstream task texts once for every evaluation (task_concepts)."""


rule extract_concepts:
    input:
        "resources/datasets/{dataset}",
    output:
        "results/{dataset}/concepts/concepts.json",
    log:
        "results/logs/extract_concepts/{dataset}.log",
    benchmark:
        "results/benchmarks/rules/extract_concepts/{dataset}.tsv"
    # Every stage waits on the concepts, then on the regions: they go first (the task texts after them).
    priority: 2
    conda:
        "../../environment.yml"
    threads: 2
    params:
        config=config_args(CONCEPT_KEYS),
    shell:
        "mvptr concepts extract --dataset {input:q} --out {output:q} --n-process {threads} "
        "{params.config} > {log:q} 2>&1"


rule task_concepts:
    input:
        "resources/datasets/{dataset}",
    output:
        "results/{dataset}/concepts/task_concepts.json",
    log:
        "results/logs/task_concepts/{dataset}.log",
    benchmark:
        "results/benchmarks/rules/task_concepts/{dataset}.tsv"
    conda:
        "../../environment.yml"
    threads: 2
    params:
        tasks=TEXT_TASKS,
        config=config_args(CONCEPT_KEYS),
    shell:
        "mvptr concepts tasks --dataset {input:q} --tasks {params.tasks:q} --out {output:q} --n-process {threads} "
        "{params.config} > {log:q} 2>&1"


rule concept_quality:
    input:
        dataset="resources/datasets/{dataset}",
        concepts="results/{dataset}/concepts/concepts.json",
    output:
        "results/{dataset}/concepts/concept_quality.json",
    log:
        "results/logs/concept_quality/{dataset}.log",
    benchmark:
        "results/benchmarks/rules/concept_quality/{dataset}.tsv"
    conda:
        "../../environment.yml"
    params:
        config=config_args(CONCEPT_KEYS),
    shell:
        "MVPTR_RULE=concept_quality mvptr concepts quality --dataset {input.dataset:q} "
        "--concepts {input.concepts:q} --out {output:q} {params.config} > {log:q} 2>&1"


rule build_concept_vocab:
    input:
        dataset="resources/datasets/{dataset}",
        concepts="results/{dataset}/concepts/concepts.json",
    output:
        "results/{dataset}/concepts/concept_vocab.json",
    log:
        "results/logs/build_concept_vocab/{dataset}.log",
    benchmark:
        "results/benchmarks/rules/build_concept_vocab/{dataset}.tsv"
    conda:
        "../../environment.yml"
    params:
        config=config_args(CONCEPT_KEYS),
    shell:
        "mvptr concepts vocab --dataset {input.dataset:q} --concepts {input.concepts:q} "
        "--out {output:q} {params.config} > {log:q} 2>&1"
