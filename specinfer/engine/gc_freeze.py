"""Keep Python's cyclic garbage collector off the objects that live as long as the engine.

An engine with a model loaded tracks some 380,000 objects (modules, parameters, compiled graphs), and a
step allocates thousands of short-lived ones (lists, trees, dicts). Every so often that churn sets off a
full collection, which walks all of them: 222 ms once in a 60-token run at batch 64 on a CPU, and on
average ~90 us per request per speculative step there, more than the step's own bookkeeping. Freezing
moves what exists now out of the collector's reach (reference counting still frees it), so collections
walk only what the steps allocate. Called once the engine is built and after each CUDA-graph capture (the
other moment when many long-lived objects appear: Inductor's and the graphs'). Objects are unfrozen at
exit, so that the interpreter tears them down as usual.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def freeze_long_lived_objects(collect: bool = True) -> None:
    """Freeze every object tracked now; `collect` first clears what is already garbage (a full pass,
    ~0.2 s with a model loaded: at start-up, not between steps)."""
    global _registered
    if collect:
        gc.collect()
    gc.freeze()
    if not _registered:
        atexit.register(gc.unfreeze)
        _registered = True
