"""Downstream evaluation of every method: fine-tuning on the tasks MVPTR reports, their metrics, ITM re-ranking.

Why: fine-tuned models are compared by the numbers of the MVPTR protocol (METHODS.md, "Downstream"), so the
code that computes them is kept apart from the task heads and tested on hand-computed cases:
    metrics   retrieval R@K both ways and their sum, the official VQA v2 accuracy (answer normalisation,
              leave-one-out over the 10 humans, soft targets, per question type), box IoU and grounding
              accuracy, classification accuracy overall and per class
    rerank    retrieval scoring: rank every pair by contrastive similarity, then re-score only the top-k candidates
              of each image and of each text with the cross-modal ITM head (ALBEF / MVPTR), or score every
              pair exhaustively
    encode    the uni-modal encodings of a split, computed once (retrieval, zero-shot)
    zero_shot zero-shot contrastive retrieval after pre-training, with the chance recalls
    (the readers of the task files are `mvptr.data.task_files`, the VQA answer rules `mvptr.data.vqa_answers`)
    heads     the task heads (MLP classifiers, region scores for referring expressions)
    finetune  fine-tune + evaluate one task; commands: `mvptr evaluate run` (a `mvptr.launch.job.ConfigJob`)

Use:
    from mvptr.evaluate.metrics import retrieval_recalls, vqa_report
    from mvptr.evaluate.rerank import itm_pair_scorer, rerank
    result = rerank(similarity, k_text=128, k_image=64, pair_scores=itm_pair_scorer(model, encoding))
    metrics = retrieval_recalls(result.i2t, text_to_image, t2i_scores=result.t2i)
"""
