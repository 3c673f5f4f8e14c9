"""Work that a step does once and the next ones do not: capturing a CUDA graph, or catching an SSM up on
the tokens it missed while the engine ran plain steps.

The adaptive controller times steps to learn what each tree size costs. A step that captured a graph
took tens of milliseconds where the size costs one or two; on an H200 one such step made the default
model's 64-node tree look hopeless at batch 1 for the rest of a run (0.78x where the tree itself ran
1.18x). Steps that did such work are not timed; what they committed still counts. Graph captures,
passes run with `ModelRunner.forward(..., replay=False)` and the device drafter's catch-up chains note
themselves here.
"""

_count = 0


def note() -> None:
    """Record that the step now running did one-off work."""
    global _count
    _count += 1


def count() -> int:
    """How much one-off work has been done so far: unchanged over a step means none in it."""
    return _count
