"""Import torchvision even where its compiled operators cannot load (a CPU torch beside PyPI's CUDA-built wheel).

Why: the detector path (mvptr.regions.detector) needs torchvision's Faster R-CNN. PyPI's torchvision wheels
link their C++ operators against the CUDA build of torch; beside a CPU build of torch (this project's pinned
`torch==2.13.0+cpu`, where the CPU torchvision wheel of download.pytorch.org cannot be fetched) the extension
fails to load, and torchvision 0.28's own import then fails: `_meta_registrations` registers a fake kernel
for `torchvision::nms` without checking that the operator exists ("operator torchvision::nms does not
exist"). Worse, transformers imports torchvision whenever it is installed, so every model import failed too.

So `mvptr` (its `__init__`) installs an import hook: the first `import torchvision`, from any module, first
tries to load the compiled operators; if they cannot load, it
- defines the two operators whose fakes are registered unconditionally (`nms`, `qnms`), with a Python CPU
  kernel for `nms` - the C++ kernel's greedy algorithm: boxes by descending score, each kept box suppresses
  every later one whose IoU with it is above the threshold (IoU with torchvision's `box_iou`).
Then `import_torchvision()`, what the detector calls,
- lets `torchvision.ops.nms` call that kernel (torchvision checks `torchvision.extension._has_ops()`);
- leaves RoIAlign to torchvision's own pure-Python `_roi_align`, which `roi_align` uses whenever its compiled
  operators are missing, run eagerly: torchvision wraps it in `torch.compile` on first use, which took 8 s per
  process here and needs a C++ compiler.
Where the compiled operators load (a matching CPU or CUDA wheel), nothing is changed. The other operators
(deformable convolution, RoIPool, ...) stay unavailable here; the detector does not use them.

Use: `install_import_hook()` (done by `import mvptr`); `tv = import_torchvision()`; `compiled_ops()` says
which kernels run.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from mvptr.errors import ConfigError

if TYPE_CHECKING:
    import torch

_LIBRARY: torch.library.Library | None = None  # keeps the Python definitions registered


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the kept boxes, by decreasing score: torchvision's greedy NMS, in Python."""
    import torch
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
    import torch

    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive in _LIBRARY
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.impl("nms", nms_reference, "CPU")
    _LIBRARY = library


def _prepare_operators() -> None:
    """Load torchvision's compiled operators, or define the Python ones its import needs."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    try:
        torch.ops.load_library(str(Path(spec.submodule_search_locations[0]) / "_C.so"))
    except (OSError, RuntimeError):
        _define_operators()


class _OperatorsFirst(importlib.abc.MetaPathFinder):
    """Runs `_prepare_operators` just before the first import of torchvision, then steps aside."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            _prepare_operators()
        return None  # the normal finders import it


def install_import_hook() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _OperatorsFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _OperatorsFirst())


def import_torchvision() -> ModuleType:
    """torchvision, its nms and RoIAlign working (compiled, or the Python kernels)."""
    install_import_hook()
    try:
        import torchvision
    except ImportError as err:
        raise ConfigError("config key 'regions.boxes': 'detector' needs torchvision, an optional extra; install it "
                          "with `pip install .[detector]` or use regions.boxes=gold") from err
    if _LIBRARY is not None:
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
