"""Warm-up schedules of DGC (Lin et al. 2018, section 3.3).

Both are pure functions of the (fractional) epoch, so they need no state of
their own beyond their configuration and resume exactly from the epoch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .compressors.base import check_int, check_range

__all__ = ["SparsityWarmup", "LinearLRWarmup"]


class _ConfigState:
    """state_dict of a schedule: its configuration (and recorded base values), validated on load.

    A base of dataclasses only: the two declarations below (for the type checker) are theirs."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    __post_init__: Callable[[], None]

    def state_dict(self) -> dict[str, Any]:
        """The schedule's configuration (and recorded base values), for checkpoints.

        Returns:
            The dataclass fields by name.
        """
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, then check the values as the constructor does.

        Args:
            state: what :meth:`state_dict` returned.

        Raises:
            ValueError: a value out of range.
        """
        for key, value in state.items():
            setattr(self, key, value)
        self.__post_init__()


@dataclass(kw_only=True)
class SparsityWarmup(_ConfigState):
    """Exponential sparsity warm-up.

    The warm-up period is split into ``stages`` equal parts; in stage ``s`` the
    density is ``initial_density * decay**s`` (never below the final density),
    then ``final_density``.  The defaults reproduce the paper: densities 25%,
    6.25%, 1.5625%, 0.390625% over the first four epochs, then 0.1%.

    Args:
        final_density: the density after the warm-up, in (0, 1].
        warmup_epochs: the length of the warm-up in epochs (>= 0; 0: none).
        initial_density: the density of the first stage, in (0, 1].
        decay: the factor from one stage to the next, in (0, 1].
        stages: the number of stages (>= 1).

    Raises:
        ValueError: a value out of range.

    Example:
        >>> import gradcomp
        >>> warmup = gradcomp.SparsityWarmup()
        >>> [warmup.density(epoch) for epoch in (0, 1, 2, 3.5, 4)]
        [0.25, 0.0625, 0.015625, 0.00390625, 0.001]
        >>> round(warmup.mean_density(5), 4)  # the share of the gradient sent over 5 epochs
        0.0666
    """

    final_density: float = 0.001
    warmup_epochs: float = 4.0
    initial_density: float = 0.25
    decay: float = 0.25
    stages: int = 4

    def __post_init__(self) -> None:
        check_range("SparsityWarmup", "final_density", self.final_density, 0.0, 1.0, low_open=True)
        check_range("SparsityWarmup", "warmup_epochs", self.warmup_epochs, 0.0, math.inf, high_open=True)
        check_range("SparsityWarmup", "initial_density", self.initial_density, 0.0, 1.0, low_open=True)
        check_range("SparsityWarmup", "decay", self.decay, 0.0, 1.0, low_open=True)
        check_int("SparsityWarmup", "stages", self.stages, 1)

    def density(self, epoch: float) -> float:
        """The density at ``epoch``.

        Args:
            epoch: the (fractional) epoch, from 0.

        Returns:
            The density of the stage ``epoch`` falls in, or ``final_density`` after the warm-up.
        """
        if epoch >= self.warmup_epochs:
            return self.final_density
        stage = min(self.stages - 1, int(epoch / self.warmup_epochs * self.stages))
        return max(self.final_density, self.initial_density * self.decay**stage)

    def mean_density(self, epochs: float, samples: int = 10_000) -> float:
        """Average density over ``[0, epochs)``: the share of the gradient sent over a run.

        Args:
            epochs: the length of the run in epochs.
            samples: the points of the midpoint rule that averages the density.

        Returns:
            The mean of :meth:`density` over the run.
        """
        return sum(self.density(epochs * (i + 0.5) / samples) for i in range(samples)) / samples


@dataclass(kw_only=True)
class LinearLRWarmup(_ConfigState):
    """Linear learning-rate warm-up: the factor rises from ``start_factor`` to 1
    over ``warmup_epochs`` (Goyal et al. 2017, used by DGC for large batches).

    ``apply(optimizer, epoch)`` sets each param group's ``lr`` to its base lr
    (recorded at the first call, kept in ``state_dict``) times the factor.

    Args:
        warmup_epochs: the length of the warm-up in epochs (>= 0; 0: none).
        start_factor: the factor at epoch 0, in (0, 1].
        base_lrs: each param group's base learning rate (empty: recorded at the first :meth:`apply`).

    Raises:
        ValueError: a value out of range.

    Example:
        >>> import torch, gradcomp
        >>> warmup = gradcomp.LinearLRWarmup(warmup_epochs=5, start_factor=0.1)
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> for epoch in (0, 2.5, 5):
        ...     warmup.apply(optimizer, epoch)
        ...     print(round(optimizer.param_groups[0]["lr"], 4))
        0.01
        0.055
        0.1
        >>> warmup.state_dict()
        {'warmup_epochs': 5, 'start_factor': 0.1, 'base_lrs': [0.1]}
    """

    warmup_epochs: float = 5.0
    start_factor: float = 0.1
    base_lrs: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        check_range("LinearLRWarmup", "warmup_epochs", self.warmup_epochs, 0.0, math.inf, high_open=True)
        check_range("LinearLRWarmup", "start_factor", self.start_factor, 0.0, 1.0, low_open=True)

    def factor(self, epoch: float) -> float:
        """The factor at ``epoch``.

        Args:
            epoch: the (fractional) epoch, from 0.

        Returns:
            From ``start_factor`` at epoch 0, rising linearly to 1 at ``warmup_epochs``, then 1.
        """
        if self.warmup_epochs == 0 or epoch >= self.warmup_epochs:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * max(epoch, 0.0) / self.warmup_epochs

    def apply(self, optimizer: torch.optim.Optimizer, epoch: float) -> None:
        """Set each param group's ``lr`` to its base lr times :meth:`factor` ``(epoch)``.

        Args:
            optimizer: the optimizer; its learning rates at the first call are recorded as the base ones.
            epoch: the (fractional) epoch, from 0.

        Raises:
            ValueError: the optimizer has another number of param groups than were recorded.
        """
        if not self.base_lrs:
            self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if len(self.base_lrs) != len(optimizer.param_groups):
            raise ValueError(
                f"LinearLRWarmup recorded {len(self.base_lrs)} param groups, the optimizer has "
                f"{len(optimizer.param_groups)}"
            )
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(epoch)
