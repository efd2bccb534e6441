"""The headline numbers of each downstream task, as patterns over the flat metric names of `mvptr evaluate run`.

Why a module of its own: the comparison table (`mvptr compare`) and the MLflow parent runs (`mvptr.tracking`)
must pick the same numbers, and neither may import the other (tracking sits below the evaluation code that
the comparison imports).

Use: `fnmatch.fnmatchcase(f"{task}/{key}", pattern)` for a pattern in HEADLINE_METRICS.
"""

# Retrieval's R@1 and R-sum zero-shot, fine-tuned and re-ranked; VQA's overall accuracy; the others' accuracy
# per split.
HEADLINE_METRICS = ["retrieval/splits/*/*/r_sum", "retrieval/splits/*/*/*_r_at_1", "vqa/splits/*/overall",
                    "ve/splits/*/accuracy", "rec/splits/*/accuracy", "nlvr2/splits/*/accuracy"]
