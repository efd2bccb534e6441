"""Data rules: download a corpus's sources, fetch web image lists, prepare the dataset folder.

A corpus (dataset.corpus, e.g. configs/datasets/4m.yaml) is downloaded source by source into
resources/downloads/<source>/, shared by every config that reads it; the manifest is each download's output, so
that a failed or interrupted download keeps its partial files for the next run to resume. The synthetic world
and a coco_format folder need no download.
"""


rule download_source:
    output:
        "resources/downloads/{source}/manifest.json",
    log:
        "results/logs/download_source/{source}.log",
    benchmark:
        "results/benchmarks/rules/download_source/{source}.tsv"
    conda:
        "../../environment.yml"
    resources:
        # How to fetch (download.*: workers, retries, mirrors): a resource, not a param, so that another mirror
        # does not refetch what landed (sizes and checksums are verified whatever the mirror).
        launch=LAUNCH_ARGS,
    params:
        config=config_args(["download.catalog"]),
        entry=source_entry,
        out=lambda wildcards, output: Path(output[0]).parent,
    shell:
        "mvptr data download --source {wildcards.source:q} --out {params.out:q} {params.config} {resources.launch} "
        "> {log:q} 2>&1"


# img2dataset runs from its own environment (download.img2dataset; `make img2dataset`).
rule fetch_web_images:
    input:
        "resources/downloads/{source}/manifest.json",
    output:
        "resources/downloads/{source}/images.json",
    log:
        "results/logs/fetch_web_images/{source}.log",
    benchmark:
        "results/benchmarks/rules/fetch_web_images/{source}.tsv"
    conda:
        "../../environment.yml"
    resources:
        launch=LAUNCH_ARGS,
    params:
        config=config_args(["download.catalog"]),
        folder=lambda wildcards, output: Path(output[0]).parent,
    shell:
        "mvptr data web-images --source {wildcards.source:q} --dir {params.folder:q} {params.config} {resources.launch} "
        "> {log:q} 2>&1"


rule prepare_data:
    input:
        source_inputs(),
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
        "mvptr data prepare --out {output:q} --downloads resources/downloads {params.config} > {log:q} 2>&1"
