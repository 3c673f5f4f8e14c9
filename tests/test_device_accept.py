import random

import torch

from specinfer.spec.device_accept import GreedyPaths
from specinfer.spec.tree import TokenTree
from specinfer.spec.verify import verify_greedy_targets


def random_tree(rng: random.Random, nodes: int) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, nodes)]


def test_the_device_keeps_the_path_the_host_keeps():
    """Random trees with few distinct tokens (so that paths match often, and two paths reach the same
    depth), against the host's walk: the same path, depth, LLM token and catch-up chain."""
    rng = random.Random(0)
    for trial in range(40):
        parents = random_tree(rng, rng.randrange(1, 30))
        paths = GreedyPaths(parents, torch.device("cpu"))
        batch = 5
        tokens = torch.randint(0, 3, (batch, len(parents)))
        targets = torch.randint(0, 3, (batch, len(parents)))
        path, depth, bonus = paths(tokens, targets)
        chain, lengths, _ = paths.chains(tokens, targets)
        for b in range(batch):
            tree = TokenTree(tokens[b].tolist(), parents)
            result = verify_greedy_targets(tree, targets[b].tolist())
            assert path[b, : len(result.accepted)].tolist() == result.accepted, trial
            assert depth[b] == len(result.accepted) - 1 and bonus[b] == result.next_token
            assert chain[b, : lengths[b]].tolist() == result.new_tokens(tree)
