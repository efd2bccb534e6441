"""Read a pickle that may hold only plain data: dicts, lists, tuples, strings, bytes, numbers, booleans, None.

Why: RefCOCO+ publishes its referring expressions as a pickle (`refs(unc).p`), and unpickling runs whatever
callable the file names. Plain containers need no callable at all, so this unpickler refuses every global a
pickle asks for (`find_class`), which is the whole attack surface: a pickle that names `os.system`, or any
class, fails with the name it asked for instead of running it.

Use:
    refs = load_plain_pickle(Path("refcoco+/refs(unc).p"))
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from mvptr.errors import DataError


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, handle: Any, path: Path) -> None:
        # latin1: the RefCOCO pickles were written by Python 2, whose str is bytes.
        super().__init__(handle, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise DataError(f"{self.path}: the pickle asks for {module}.{name}; only plain containers (dict, list, "
                        f"tuple, str, bytes, numbers, bool, None) are accepted")


def load_plain_pickle(path: Path) -> Any:
    """The object in the pickle at `path`; DataError if it names any class or function."""
    try:
        with open(path, "rb") as handle:
            return _PlainUnpickler(handle, path).load()
    except FileNotFoundError as err:
        raise DataError(f"file not found: {path}") from err
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable pickle: {err}") from err
