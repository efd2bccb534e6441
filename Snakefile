"""The mvptr workflow: wiring only. Rules live in workflow/rules/, logic in src/mvptr/ (the `mvptr` CLI).

Run from the repository root:
    snakemake --cores 2 --workflow-profile workflow/profiles/default all     (what `make demo` does)
    snakemake -n                                                             (dry run)
    snakemake --cores 2 --config 'dataset={synthetic: {size: tiny}}'        (overrides, see README)
    snakemake --cores 2 --workflow-profile workflow/profiles/default study --configfile configs/study.yaml
                                                                             (the seeded study: `make study`)
"""

from snakemake.utils import min_version

min_version("9.0")


# Relative to the Snakefile, so that --directory elsewhere still finds it.
configfile: f"{workflow.basedir}/configs/default.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/concepts.smk"
include: "workflow/rules/regions.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/dvc.smk"


rule all:
    default_target: True
    input:
        dataset_dir(),
        concept_outputs(),
        regions_dir(),
        stage_outputs(),
        evaluation_outputs(),
        summary_outputs(),
        dvc_exports(),


rule data_only:
    input:
        dataset_dir(),


rule pretrain_only:
    input:
        dataset_dir(),
        concept_outputs(),
        regions_dir(),
        stage_outputs(),


rule evaluate_only:
    input:
        evaluation_outputs(),
        summary_outputs(),
        dvc_exports(),


# The seeded study (configs/study.yaml: every method, ablation and the no-pretraining baseline, >= 3 seeds): the
# same DAG as `all`, its summary then copied to results/study/ (a path no config hash moves; the README's figures);
# refused, naming the file, under a config with fewer seeds.
rule study:
    input:
        lambda wildcards: study_outputs(),
    output:
        directory("results/study"),
    log:
        "results/logs/study.log",
    conda:
        "environment.yml"
    params:
        summary=f"results/summary/{DATASET}",
    shell:
        "mkdir -p {output:q} && cp {params.summary:q}/* {output:q}/ > {log:q} 2>&1"
