"""The largest stable lr * lambda of DGA on a quadratic (notes/dga-stability.md).

    python notes/dga_bounds.py

Loss lambda/2 w^2 per worker, SGD with heavy-ball momentum beta on the applied update (as the optimizer
DelayedGradientAveraging wraps), delay D:

* without correction every worker applies the average of D steps ago: b_i = beta b_{i-1} + lambda w_{i-D},
  w_{i+1} = w_i - lr b_i; characteristic polynomial (z - 1)(z - beta) z^D + x z, x = lr * lambda;
* with correction the workers' mean follows synchronous SGD exactly (D = 0 above), and a worker's deviation
  e from the mean follows e_{i+1} - e_i = -lr mom(lambda e_i - lambda e_{i-D}): (z - 1)(z - beta) z^D
  + x z (z^D - 1), whose root z = 1 is neutral (the deviations' sum neither grows nor decays).
"""

import numpy as np


def _largest_root(poly: np.ndarray) -> float:
    return float(np.max(np.abs(np.roots(poly)))) if len(poly) > 1 else 0.0


def _delayed(x: float, delay: int, beta: float) -> np.ndarray:
    base = np.polymul(np.polymul([1.0, -1.0], [1.0, -beta]), [1.0] + [0.0] * delay)
    return np.polyadd(base, [x, 0.0])


def _deviation(x: float, delay: int, beta: float) -> np.ndarray:
    base = np.polymul(np.polymul([1.0, -1.0], [1.0, -beta]), [1.0] + [0.0] * delay)
    poly = np.polyadd(base, np.polymul([x, 0.0], np.polyadd([1.0] + [0.0] * delay, [-1.0])))
    quotient, _ = np.polydiv(poly, [1.0, -1.0])  # the neutral root z = 1
    return quotient


def threshold(polynomial, delay: int, beta: float) -> float:
    """The largest x = lr * lambda with every root strictly inside the unit circle (bisection)."""
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _largest_root(polynomial(mid, delay, beta)) < 1 - 1e-9 else (lo, mid)
    return lo


if __name__ == "__main__":
    print("| D | w/o correction, beta 0 | w/o correction, beta 0.9 | with correction (deviations), beta 0 | "
          "with correction (deviations), beta 0.9 |")
    print("| -: | -: | -: | -: | -: |")
    for d in (0, 1, 2, 5, 10, 15, 20):
        cells = [threshold(_delayed, d, b) for b in (0.0, 0.9)]
        cells += [threshold(_deviation, d, b) if d else float("nan") for b in (0.0, 0.9)]
        print(f"| {d} | " + " | ".join("—" if c != c else f"{c:.4f}" for c in cells) + " |")
