"""attnkit: efficient attention for long-context transformers.

    import attnkit as ak
    o = ak.attention(q, k, v, method="sliding_window", window=256, sinks=4)
    o, lse = ak.attention(q, k, v, method="dense", return_lse=True)
    ak.list_methods(); ak.explain(q, k, v, method="dense")
    ak.register_selection("mine", options=MyOptions, select=my_select)  # a mechanism of your own

Tensors are sequence-first: q `[B, Tq, Hq, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]`.
"""

from . import config, core, ops, registry
from . import methods  # noqa: F401  (registers the softmax-family methods)
from . import linear  # noqa: F401  (registers the linear / recurrent family)
from . import kv, layers, models
from .api import attention, explain
from .core import AttnkitError, BackendError, KVSelection, OptionError, from_bhtd, masks, to_bhtd
from .registry import list_methods, register_selection

__version__ = "0.1.0"

__all__ = [
    "AttnkitError", "BackendError", "KVSelection", "OptionError", "__version__", "attention", "config", "core", "explain",
    "from_bhtd", "kv", "layers", "linear", "list_methods", "masks", "methods", "models", "ops", "register_selection",
    "registry", "to_bhtd",
]


def __getattr__(name: str):
    # `attnkit.hf` imports transformers: load it only when asked for
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
