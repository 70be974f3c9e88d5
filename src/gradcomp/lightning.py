"""gradcomp in PyTorch Lightning: a callback that compresses DDP's gradient exchange.

Lightning's ``DDPStrategy(ddp_comm_hook=...)`` registers a DDP communication
hook only when the device is CUDA (``pytorch_lightning/strategies/ddp.py``,
``_register_ddp_hooks``): on CPU (gloo) it trains dense, without a word.  And
Lightning's checkpoints hold no gradcomp state, so ``fit(ckpt_path=...)``
would resume a DGC run with empty memory.  :class:`GradientCompression`
closes both gaps::

    trainer = Trainer(strategy="ddp", callbacks=[GradientCompression(gradcomp.DGC(density=0.001))])

It registers :func:`~gradcomp.ddp_comm_hook` on the model the strategy
wrapped, on CPU and CUDA alike; refuses an optimizer that doubles a method's
momentum; skips the optimizer step on every rank when the hook skipped a step
(a NaN or Inf on some rank); under ``precision="16-mixed"`` hands
Lightning's ``GradScaler`` to the hook (memory in unscaled units, overflows
reaching the scaler); and saves every rank's own memory in the checkpoint.

This module imports Lightning; ``import gradcomp`` does not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import state_to_cpu, state_to_device
from .compressors.base import Compressor
from .ddp_hook import HookState, ddp_comm_hook
from .guard import Nonfinite, check_nonfinite
from .method import Method, as_method

if TYPE_CHECKING:  # the same package under its two names: the type checker reads the first
    import pytorch_lightning as pl
else:
    try:
        import pytorch_lightning as pl
    except ImportError:  # the unified ``lightning`` package only
        import lightning.pytorch as pl

__all__ = ["GradientCompression"]

log = logging.getLogger(__name__)


class GradientCompression(pl.Callback):
    """Train with a gradcomp method under Lightning's ``DDPStrategy``, on CPU (gloo) or CUDA (NCCL).

    At ``on_fit_start``, after the strategy wrapped the model in
    :class:`~torch.nn.parallel.DistributedDataParallel`, the callback checks
    each optimizer against the method (:func:`gradcomp.method.check_optimizer`:
    DGC applies momentum itself, so momentum SGD or Adam would apply it twice)
    and registers :func:`gradcomp.ddp_comm_hook` with a fresh
    :class:`gradcomp.HookState` (memory keyed by parameter name).  Do not also
    pass ``ddp_comm_hook`` to ``DDPStrategy``: DDP takes one hook.

    A step in which some rank's gradient holds a NaN or Inf is skipped on
    every rank (``nonfinite="skip"``): the hook leaves memory unchanged and
    this callback keeps the optimizer from moving the weights (from this
    callback's ``on_before_optimizer_step`` on, that step's parameters have
    ``.grad`` None; Lightning's global step and LR schedulers still advance,
    as with ``torch.amp.GradScaler``'s skipped steps).

    Checkpoints made by Lightning (``ModelCheckpoint``,
    ``trainer.save_checkpoint``, on every rank as Lightning requires) hold
    every rank's own state, gathered to rank 0, which writes the file; on
    ``fit(ckpt_path=...)`` each rank takes its own entry back before the first
    step.  A checkpoint saved with another world size or another method
    configuration is refused with a :class:`ValueError`.

    Args:
        method: a :class:`gradcomp.Method` (``gradcomp.DGC(...)``), a
            :class:`gradcomp.Compressor` or a registered compressor name such as ``"topk"``.
        nonfinite: ``"skip"`` (skip the step on every rank) or ``"raise"``
            (raise :class:`gradcomp.NonFiniteGradientError` on the rank that saw it).
        process_group: the group the hook communicates on (None: the default group).

    Raises:
        TypeError, ValueError: a bad ``method`` or ``nonfinite`` (at construction; no process group needed).
        ValueError: at ``on_fit_start``, a strategy that is not DDP or an optimizer with momentum paired
            with a method that owns momentum; when a checkpoint is loaded, another world size or method config.

    Example::

        import gradcomp
        from gradcomp.lightning import GradientCompression

        dgc = GradientCompression(gradcomp.DGC(density=0.01, warmup_epochs=0))
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, callbacks=[dgc])
        trainer.fit(model)  # model.configure_optimizers: torch.optim.SGD(..., momentum=0)
        print(dgc.state.comm.bytes_sent)
    """

    def __init__(self, method: Method | Compressor | str, *, nonfinite: Nonfinite = "skip",
                 process_group: dist.ProcessGroup | None = None) -> None:
        self.method = as_method(method)
        self.nonfinite = check_nonfinite("GradientCompression", nonfinite)
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"GradientCompression: process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        self.process_group = process_group
        self._state: HookState | None = None
        self._loaded: dict[str, Any] | None = None  # this rank's entry of a checkpoint, until the hook is set up

    @property
    def state(self) -> HookState | None:
        """This fit's :class:`~gradcomp.HookState` (memory, ``comm.bytes_sent``, ``step_skipped``); None before."""
        return self._state

    # -- hook-up ------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Register the hook on the model the strategy wrapped, with a fresh :class:`~gradcomp.HookState`,
        after checking each optimizer against the method; a checkpoint's state is applied to it.

        Args:
            trainer: the Lightning trainer.
            pl_module: the Lightning module.

        Raises:
            ValueError: the strategy is not DDP, or an optimizer cannot be paired with the method.
            RuntimeError: DDP has a comm hook already (``DDPStrategy(ddp_comm_hook=...)``).
        """
        ddp = trainer.strategy.model
        if not isinstance(ddp, DistributedDataParallel):
            raise ValueError(f"GradientCompression needs Lightning's DDPStrategy (strategy=\"ddp\"), which wraps the "
                             f"model in DistributedDataParallel; found {type(trainer.strategy).__name__} with a "
                             f"{type(ddp).__name__} model")
        # A fresh state per fit, like the optimizers Lightning builds per fit; a checkpoint fills it below.
        # 16-mixed: the hook divides the loss scale out (memory in gradient units) and leaves Inf on an
        # overflow, so Lightning's GradScaler skips the step and lowers its scale (see gradcomp.ddp_hook)
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        self._state = HookState(self.method, self.process_group, model=ddp, nonfinite=self.nonfinite, scaler=scaler)
        for optimizer in trainer.optimizers:
            self._state.core.set_optimizer(optimizer)  # refuses an optimizer the method cannot be paired with
        self._apply_loaded(ddp)
        try:
            ddp.register_comm_hook(self._state, ddp_comm_hook)
        except RuntimeError as error:
            raise RuntimeError(f"GradientCompression could not register its DDP comm hook ({error}); pass no "
                               "ddp_comm_hook to DDPStrategy when using this callback") from error
        log.info("gradcomp %r registered as DDP comm hook on rank %d of %d", self.method, self._state.comm.rank,
                 self._state.comm.world_size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply a checkpoint's state restored after :meth:`on_fit_start` (strategies that restore late).

        Args:
            trainer: the Lightning trainer.
            pl_module: the Lightning module.
        """
        # DDPStrategy restores callbacks before on_fit_start; a strategy with restore_checkpoint_after_setup
        # restores them after it.  Either way the state is in place before the first batch.
        self._apply_loaded(trainer.strategy.model)

    def _apply_loaded(self, ddp: torch.nn.Module | None) -> None:
        if self._loaded is None or self._state is None:
            return
        assert ddp is not None  # the strategy wrapped the model before the state was set up (on_fit_start)
        device = next(ddp.parameters()).device
        self._state.load_state_dict(state_to_device(self._loaded, device))
        self._loaded = None
        log.info("gradcomp state restored from the checkpoint on rank %d", self._state.comm.rank)

    # -- skipped steps ------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Clear ``state.step_skipped`` (the batch's hook call sets it again).

        Args:
            trainer: the Lightning trainer.
            pl_module: the Lightning module.
            batch: the batch.
            batch_idx: its index.
        """
        if self._state is not None:
            self._state.step_skipped = False  # set again by this batch's hook call

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """On a step the hook skipped, set every gradient of ``optimizer`` to None, so its step changes nothing.

        Args:
            trainer: the Lightning trainer.
            pl_module: the Lightning module.
            optimizer: the optimizer about to step.
        """
        # Lightning's Precision.optimizer_step calls ``optimizer.step(closure=wrapped)``; ``wrapped`` runs the
        # training step and backward (so the hook has decided ``step_skipped`` on every rank), then this hook,
        # then gradient clipping, and only after it returns does the optimizer compute its update (AMP: the
        # scaler unscales before this hook and steps after it).  The step cannot be cancelled from here, but
        # it can be made empty: every torch.optim optimizer leaves a parameter whose ``.grad`` is None alone
        # (no momentum, weight decay or step count; the contract ``zero_grad(set_to_none=True)`` relies on).
        # The same holds in manual optimization, where ``LightningOptimizer.step`` takes the same path.
        if self._state is None or not self._state.step_skipped:
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    # -- checkpoints --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every rank's state, gathered to rank 0 (the rank Lightning writes from): ``{"world_size",
        "method": method.config(), "ranks": [rank 0's state, rank 1's, ...]}``; on other ranks the list holds
        only their own entry.  A collective: Lightning calls it on every rank.

        Returns:
            That dict; empty before :meth:`on_fit_start`.
        """
        if self._state is None:
            return {}
        comm = self._state.comm
        own = state_to_cpu(self._state.state_dict())
        ranks: list[Any] = [None] * comm.world_size
        if comm.world_size == 1:
            ranks[0] = own
        else:
            dist.gather_object(own, ranks if comm.rank == 0 else None, group=comm.group, group_dst=0)
            if comm.rank != 0:
                ranks[comm.rank] = own
        return {"world_size": comm.world_size, "method": self.method.config(), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the checkpoint against this run and keep this rank's entry for the hook (see the class).

        Args:
            state_dict: what :meth:`state_dict` returned on rank 0, read back from the checkpoint.

        Raises:
            ValueError: the checkpoint was saved by another number of ranks or with another method
                configuration, or holds no entry for this rank.
        """
        world, rank = 1, 0
        if dist.is_initialized():
            world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        saved_world = state_dict["world_size"]
        if saved_world != world:
            raise ValueError(f"GradientCompression: checkpoint saved by {saved_world} ranks, this run has {world}; "
                             "gradcomp's memory is per rank and cannot be split or merged (to start with empty "
                             f"memory, delete checkpoint['callbacks'][{self.state_key!r}])")
        saved, now = state_dict["method"], self.method.config()
        if saved != now:
            diff = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {now.get(key)!r} in this run"
                             for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key))
            raise ValueError(f"GradientCompression: checkpoint saved with another method config ({diff})")
        entry = state_dict["ranks"][rank]
        if entry is None:
            raise ValueError(f"GradientCompression: checkpoint holds no gradcomp state for rank {rank} (only rank 0 "
                             "writes every rank's state)")
        self._loaded = entry

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Warn when the checkpoint holds no gradcomp state (the memory then starts empty).

        Args:
            trainer: the Lightning trainer.
            pl_module: the Lightning module.
            checkpoint: the checkpoint being loaded.
        """
        if not checkpoint.get("callbacks", {}).get(self.state_key):
            log.warning("the checkpoint holds no gradcomp state (saved without GradientCompression?): the memory "
                        "of %r starts empty", self.method)
