"""Package names that import their module on first use (PEP 562), so that `megamor --help` and
argument parsing load no torch: a package lists `_EXPORTS = {name: submodule}` (a literal:
tests/test_imports.py reads it to draw the import graph) and takes its `__getattr__` and
`__dir__` from `lazy_exports`."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` (its `__name__`, `_EXPORTS`, `globals()`): a
    name is imported from its submodule when first asked for, then kept in the namespace."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
