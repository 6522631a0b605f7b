"""emascope: a bank of many EMA decays of a model's weights, attached to a training job, scored live.

```python
from emascope import attach, EMABank
```

Imports are lazy: ``import emascope`` (and the torch-free modules ``emascope.runformat``,
``emascope.atomic``, ``emascope.dashboard.*``) never import torch; the first use of a name below
imports the module that holds it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from emascope.version import __version__

#: public name -> module that defines it
_LAZY = {
    "attach": "emascope.scope",
    "Scope": "emascope.scope",
    "EMABank": "emascope.bank",
    "DEFAULT_DECAYS": "emascope.ema_math",
    "BEMAConfig": "emascope.ema_math",
    "variant_name": "emascope.runformat",
    "parse_variant": "emascope.runformat",
    "save_snapshot": "emascope.snapshot",
    "load_snapshot": "emascope.snapshot",
    "export_checkpoint": "emascope.snapshot",
    "synthesize": "emascope.posthoc",
    "export_synthesized": "emascope.posthoc",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from emascope.bank import EMABank  # noqa: F401
    from emascope.ema_math import DEFAULT_DECAYS, BEMAConfig  # noqa: F401
    from emascope.posthoc import export_synthesized, synthesize  # noqa: F401
    from emascope.runformat import parse_variant, variant_name  # noqa: F401
    from emascope.scope import Scope, attach  # noqa: F401
    from emascope.snapshot import export_checkpoint, load_snapshot, save_snapshot  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'emascope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
