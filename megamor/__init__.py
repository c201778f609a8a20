"""megamor: pretraining Mixture-of-Recursions language models on megatron-core.

`megamor.launch` and `megamor.tokenizer` live in the folders launch/ and tokenizer/ beside this
package (the layout users know); an install puts them inside it (setup.py's `package_dir`), so
site-packages gains no top-level `launch` or `tokenizer`. Code run from a source checkout, not
installed (PYTHONPATH=checkout) or installed in editable mode, finds them through the finder
below, which maps the two names to the folders beside *this* `megamor/`: never another
checkout's (an editable install of another checkout, e.g. a shared venv's, would otherwise
answer for names this package does not hold itself). tests/test_imports.py checks it.
"""

import os
import sys
from importlib.util import spec_from_file_location

_SIBLINGS = ("launch", "tokenizer")


class _SiblingPackages:
    """A meta path finder for `megamor.<name>` -> `<checkout>/<name>/`."""

    def __init__(self, folders: dict):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                       submodule_search_locations=[folder])


def _checkout_folders() -> dict:
    """The sibling folders, when this package sits in a checkout (setup.py beside it) without
    them inside it (an install has them inside)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isfile(os.path.join(root, "setup.py")):
        return {}
    return {f"{__name__}.{n}": os.path.join(root, n) for n in _SIBLINGS
            if os.path.isfile(os.path.join(root, n, "__init__.py"))
            and not os.path.exists(os.path.join(here, n))}


_folders = _checkout_folders()
if _folders:
    sys.meta_path.insert(0, _SiblingPackages(_folders))
