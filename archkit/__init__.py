"""archkit: config-driven architecture search for hybrid language models that sleep.

The Python front door (see ``archkit.api``): ``load_spec``, ``build``, ``train``,
``load_run``, ``evaluate`` and ``search``; metric names are ``archkit.metrics``'.
"""

from archkit.api import build, evaluate, load_run, load_spec, search, train

__version__ = "0.1.0"

__all__ = ["build", "evaluate", "load_run", "load_spec", "search", "train"]
