"""Drive methods outside the simulator's training loop: one call = one step of N workers."""

import torch

from gradcomp.simulator import run_exchanges


def exchange_step(methods, grads_per_worker):
    """One step: ``grads_per_worker[w]`` is worker w's {name: grad}; returns (averages of worker 0, bytes sent)."""
    n = len(methods)
    prepared = [m.prepare(g, n) for m, g in zip(methods, grads_per_worker)]
    gens = [{name: m.exchange(name, g[name], n) for name in g} for m, g in zip(methods, prepared)]
    results, sent = run_exchanges(gens)
    for m in methods:
        m.end_step()
    for other in results[1:]:
        for name in results[0]:
            assert torch.equal(other[name], results[0][name]), "workers disagree on the average"
    return results[0], sent
