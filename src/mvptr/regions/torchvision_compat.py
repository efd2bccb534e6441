"""Import torchvision even where its compiled operators cannot load (a CPU torch beside PyPI's CUDA-built wheel).

Why: the detector path (mvptr.regions.detector) needs torchvision's Faster R-CNN. PyPI's torchvision wheels
link their C++ operators against the CUDA build of torch; beside a CPU build of torch (this project's pinned
`torch==2.13.0+cpu`, where the CPU torchvision wheel of download.pytorch.org cannot be fetched) the extension
fails to load, and torchvision 0.28's own import then fails: `_meta_registrations` registers a fake kernel
for `torchvision::nms` without checking that the operator exists ("operator torchvision::nms does not
exist"). Where that happens, this module
- defines the two operators whose fakes are registered unconditionally (`nms`, `qnms`), with a Python CPU
  kernel for `nms` - the C++ kernel's greedy algorithm: boxes by descending score, each kept box suppresses
  every later one whose IoU with it is above the threshold (IoU with torchvision's `box_iou`);
- lets `torchvision.ops.nms` call it (torchvision checks `torchvision.extension._has_ops()`);
- leaves RoIAlign to torchvision's own pure-Python `_roi_align`, which `roi_align` uses whenever its compiled
  operators are missing, run eagerly: torchvision wraps it in `torch.compile` on first use, which took 8 s per
  process here and needs a C++ compiler.
Where the compiled operators load (a matching CPU or CUDA wheel), nothing is changed. The other operators
(deformable convolution, RoIPool, ...) stay unavailable here; the detector does not use them.

Use: `tv = import_torchvision()` (the module), `compiled_ops()` says which kernels run.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from mvptr.errors import ConfigError

_LIBRARY: torch.library.Library | None = None  # keeps the Python definitions registered


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the kept boxes, by decreasing score: torchvision's greedy NMS, in Python."""
    from torchvision.ops.boxes import box_iou

    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order]
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        if i + 1 < len(order):
            suppressed[i + 1:] |= box_iou(boxes[i:i + 1], boxes[i + 1:])[0] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def _define_operators() -> None:
    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive in _LIBRARY
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.impl("nms", nms_reference, "CPU")
    _LIBRARY = library


def _forget_partial_import() -> None:
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """torchvision, with the Python operators registered first if its compiled ones cannot load."""
    try:
        import torchvision
    except ImportError as err:
        raise ConfigError("config key 'regions.boxes': 'detector' needs torchvision, an optional extra; install it "
                          "with `pip install .[detector]` or use regions.boxes=gold") from err
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        _forget_partial_import()
        _define_operators()
        import torchvision
        import torchvision.extension

        # nms checks this before calling the operator; roi_align imported its own copy and keeps using
        # torchvision's Python fallback.
        torchvision.extension._has_ops = lambda: True
        roi_align = sys.modules["torchvision.ops.roi_align"]
        roi_align._roi_align = getattr(roi_align._roi_align, "__wrapped__", roi_align._roi_align)
    return torchvision


def compiled_ops() -> bool:
    """Whether torchvision's compiled kernels run (False: the Python ones of this module)."""
    import_torchvision()
    return _LIBRARY is None
