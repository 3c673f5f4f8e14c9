import torch

from specinfer.engine.ring_cache import RingCache


def test_objects_come_in_turn_and_least_recently_used_keys_are_dropped():
    made = []
    cache = RingCache(lambda key: made.append(key) or object(), depth=2, max_keys=2)
    a0, new0 = cache.next("a")
    a1, new1 = cache.next("a")
    a2, new2 = cache.next("a")
    assert (new0, new1, new2) == (True, True, False) and a2 is a0 and a1 is not a0
    cache.next("b")
    cache.next("c")  # drops "a", the least recently used
    _, again = cache.next("a")
    assert again and made == ["a", "a", "b", "c", "a"]


def test_a_buffer_first_asked_for_inside_inference_mode_can_be_refilled_outside_it():
    # A cache move deferred into a forward pass (under inference mode) stages its indices in a buffer that
    # a later commit, outside inference mode, refills in place.
    cache = RingCache(lambda n: torch.empty(n, dtype=torch.int64), depth=1, max_keys=4)
    with torch.inference_mode():
        buffer, _ = cache.next(3)
        buffer.copy_(torch.arange(3))
    again, made = cache.next(3)
    assert again is buffer and not made and not again.is_inference()
    again.copy_(torch.arange(3, 6))
    assert again.tolist() == [3, 4, 5]
