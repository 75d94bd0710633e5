"""Optional dependencies: one clear ImportError naming the extra that provides a missing package.

The core install (``pip install cdp``) is torch, numpy, safetensors, pyyaml, tqdm and tyro; plotting, logging,
data formats, simulators and Ray are extras (``pyproject.toml``): ``plots``, ``log``, ``il``, ``rl``, ``pusht``,
``bench``, ``robosuite``, ``dev`` (all of them).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module → the pip package that provides it (where the names differ)
PACKAGES = {"PIL": "pillow", "yaml": "pyyaml", "gym_pusht": "gym-pusht", "gymnasium_robotics": "gymnasium-robotics",
            "stable_baselines3": "stable-baselines3"}


def optional(module: str, extra: str, what: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or ImportError ``"<what> needs <package>: pip install 'cdp[<extra>]'"``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is broken: keep that error
        pkg = PACKAGES.get(top, top)
        raise ImportError(f"{what or module} needs the package '{pkg}': pip install 'cdp[{extra}]'") from None
