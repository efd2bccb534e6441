"""The embedded synthetic world: a deterministic image-caption corpus with VQA, SNLI-VE, RefCOCO and NLVR2 tasks.

Use: `generate_world(out_dir, num_images=SIZES["tiny"], seed=0)`; see `world` for the layout it writes.
"""

from mvptr.data.synthetic.world import SIZES, generate_world

__all__ = ["SIZES", "generate_world"]
