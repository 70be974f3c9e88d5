"""Every rank's gradcomp state in ``torch.distributed.checkpoint`` (DCP) and in Accelerate checkpoints.

A front door's state (:class:`~gradcomp.HookState`, :class:`~gradcomp.DistributedOptimizer`, ...) holds
*this rank's* memory: residuals, DGC's momenta, step counters.  Every rank's differs, so a checkpoint must
keep one per rank and give each rank back its own.  Neither DCP nor Accelerate does that for a custom
object as it is:

* DCP keeps one copy of each key saved by several ranks (``_dedup_save_plans.dedup_save_plans``), and loads
  into the template that ``state_dict()`` returns in the loading process (``default_planner.
  create_default_local_load_plan`` reads exactly the template's keys), while gradcomp creates its memory
  lazily, at the first step: the template of a process that has not stepped yet is empty.
* Accelerate's ``register_for_checkpointing`` writes the main process's ``state_dict()`` only
  (``accelerate.utils.save``) and loads that one file on every rank (``checkpointing.load_custom_state``):
  after ``load_state`` every rank would hold rank 0's memory.

Here, each rank's state is stored under its own name: for DCP as one opaque ``bytes`` entry per rank
(:class:`RankState`; a non-tensor DCP entry is loaded whole, whatever the template held), for Accelerate
and plain loops as one file per rank (:func:`save_rank_state`, :func:`load_rank_state`,
:func:`register_with_accelerate`).  Beside it goes a fingerprint of the run: the number of ranks, the
method's configuration (``method.config()``) and, when the model is known, every parameter's name, shape
and dtype.  Loading compares it with this run first and refuses a checkpoint that does not fit with a
one-line :class:`ValueError` naming the difference, before anything of the gradcomp state changes.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["RankState", "load_rank_state", "rank_file", "register_with_accelerate", "save_rank_state", "state_tensors",
           "state_to_cpu", "state_to_device", "verify_archive", "non_finite_entries", "CorruptArchiveError"]

log = logging.getLogger(__name__)

#: Version of the stored layout (the fingerprint's ``format``).
FORMAT = 1

#: How a refused DCP load ends its message: the model's and optimizer's entries of the same ``dcp.load`` may
#: have been read in place already, gradcomp's state is left as it was.
_NOT_LOADED = "gradcomp's state was not loaded"

_RANK_FILE = re.compile(r"^gradcomp_rank(\d+)\.pt$")


# ------------------------------------------------------------------ where a state's tensors live


def state_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor of a nested state (dicts, lists, tuples), in order: to ask where a state lives.

    Args:
        obj: a state: tensors and plain values in dicts, lists and tuples.

    Yields:
        Each tensor, depth first.

    Example:
        >>> import torch
        >>> from gradcomp.checkpoint import state_tensors
        >>> [t.tolist() for t in state_tensors({"a": torch.ones(2), "b": [1, (torch.zeros(1),)]})]
        [[1.0, 1.0], [0.0]]
    """
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from state_tensors(v)


def state_to_cpu(obj: Any) -> Any:
    """A copy of a state dict with every tensor copied to the CPU: a checkpoint that loads anywhere, and what a
    rank hands an object collective (``gather_object`` would otherwise unpickle a peer's CUDA tensors onto
    that peer's GPU, in the receiving process).

    Args:
        obj: a state: tensors and plain values in dicts, lists and tuples.

    Returns:
        The same structure, every tensor a detached copy on the CPU (even one that was there already).
    """
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: state_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_to_cpu(v) for v in obj)
    return obj


def state_to_device(obj: Any, device: torch.device | str) -> Any:
    """Floating-point tensors onto ``device``: gradcomp keeps what it derives from gradients (residuals,
    momenta, warm-start factors) on the gradients' device, its integer bookkeeping (generator states, step
    counters) on the CPU.

    Args:
        obj: a state: tensors and plain values in dicts, lists and tuples.
        device: where the floating-point tensors go.

    Returns:
        The same structure with its floating-point tensors on ``device`` (not copied where they are there
        already); other tensors and values as they are.
    """
    if isinstance(obj, Tensor):
        return obj.to(device) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: state_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(state_to_device(v, device) for v in obj)
    return obj


def non_finite_entries(obj: Any, where: str = "") -> list[str]:
    """Where a nested state (dicts, lists, tuples) holds a floating-point tensor with a NaN or Inf: weights or
    momenta that would make every step non-finite.

    Args:
        obj: a state: tensors and plain values in dicts, lists and tuples.
        where: the path of ``obj`` itself, put before every path found.

    Returns:
        The paths of the non-finite tensors, as ``where['key'][0]``, in order.

    Example:
        >>> import torch
        >>> from gradcomp.checkpoint import non_finite_entries
        >>> non_finite_entries({"w": torch.ones(2), "m": [torch.tensor([float("nan")])]}, "state")
        ["state['m'][0]"]
    """
    if isinstance(obj, Tensor):
        return [where] if (obj.is_floating_point() or obj.is_complex()) and not bool(obj.isfinite().all()) else []
    if isinstance(obj, dict):
        return [bad for k, v in obj.items() for bad in non_finite_entries(v, f"{where}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [bad for i, v in enumerate(obj) for bad in non_finite_entries(v, f"{where}[{i}]")]
    return []


# ------------------------------------------------------------------ the fingerprint


def _rank_and_world(process_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _named_parameters(state: Any, model: nn.Module | Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """The parameters the memory is keyed by: ``model``'s (a DDP model's are its module's), else the state's
    own ``params`` (:class:`~gradcomp.DistributedOptimizer`, DGA), else None (not known)."""
    if model is None:
        params = getattr(state, "params", None)
        return dict(params) if isinstance(params, Mapping) else None
    if isinstance(model, Mapping):
        return dict(model)
    return dict(getattr(model, "module", model).named_parameters())


def _device_of(params: dict[str, Tensor] | None) -> torch.device | None:
    return next(iter(params.values())).device if params else None


def _method_config(state: Any) -> dict[str, Any] | None:
    """The method as the user configured it (the same on every rank), if the state has one (or is one)."""
    method = getattr(state, "configured", None) or getattr(state, "method", None) or state
    config = getattr(method, "config", None)
    return dict(config()) if callable(config) else None


def _fingerprint(state: Any, params: dict[str, Tensor] | None, world_size: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that loads it (plain values only)."""
    return {
        "format": FORMAT,
        "world_size": world_size,
        "method": _method_config(state),
        "parameters": None if params is None else
        {name: f"{list(p.shape)} {str(p.dtype).removeprefix('torch.')}" for name, p in params.items()},
    }


def _ranks(count: int) -> str:
    return f"{count} rank{'' if count == 1 else 's'}"


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How the saved fingerprint differs from this run's, one phrase each, the number of ranks first."""
    if saved.get("format") != FORMAT:
        return [f"has layout format {saved.get('format')!r}, this gradcomp reads {FORMAT}"]
    out = []
    if saved["world_size"] != current["world_size"]:
        out.append(f"saved by {_ranks(saved['world_size'])}, this run has {current['world_size']}")
    theirs, ours = saved["method"], current["method"]
    if theirs is not None and ours is not None:
        if theirs.get("method") != ours.get("method"):
            out.append(f"saved with method {theirs.get('method')!r}, this run uses {ours.get('method')!r}")
        else:
            for key in [*ours, *(k for k in theirs if k not in ours)]:
                if theirs.get(key, "(unset)") != ours.get(key, "(unset)"):
                    out.append(f"saved with {key}={theirs.get(key, '(unset)')!r}, this run has "
                               f"{key}={ours.get(key, '(unset)')!r}")
    theirs, ours = saved["parameters"], current["parameters"]
    if theirs is not None and ours is not None:
        for name in [*ours, *(n for n in theirs if n not in ours)]:
            if name not in ours:
                out.append(f"has parameter {name!r}, which this run's model lacks")
            elif name not in theirs:
                out.append(f"lacks parameter {name!r} of this run's model")
            elif theirs[name] != ours[name]:
                out.append(f"saved parameter {name!r} as {theirs[name]}, this run's model has {ours[name]}")
    return out


def _check(saved: Mapping[str, Any], current: Mapping[str, Any], where: str, outcome: str) -> None:
    """Raise a one-line ValueError naming every difference (at most 4 spelled out) between the fingerprints."""
    found = _differences(saved, current)
    if found:
        more = f"; and {len(found) - 4} more" if len(found) > 4 else ""
        raise ValueError(f"gradcomp checkpoint{where} {'; '.join(found[:4])}{more}; {outcome}")


class CorruptArchiveError(ValueError):
    """A file ``torch.save`` wrote whose bytes no longer match their CRC-32 (:func:`verify_archive`).

    Args:
        name: the file (or what it holds), put first in the message.
        detail: which entry is damaged and how; kept as ``detail``, without the file's name.
    """

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name} is corrupt: {detail}")
        self.detail = detail


def verify_archive(source: str | os.PathLike | bytes, name: str | None = None) -> None:
    """Check every byte of a file (or ``bytes``) that ``torch.save`` wrote against the CRC-32 of each entry
    stored in its zip archive, which ``torch.load`` does not check: a flipped bit or a zeroed block in a
    tensor's data would otherwise load as other weights.

    Args:
        source: the file's path, or its bytes.
        name: how the message names it (default: the path).

    Raises:
        CorruptArchiveError: a ``ValueError``, one line naming ``name`` (default: the path) and the damaged
            entry.  Something that is
            not a zip archive at all is left to ``torch.load`` to refuse.

    Example:
        >>> import io, torch
        >>> from gradcomp.checkpoint import verify_archive
        >>> buffer = io.BytesIO()
        >>> torch.save({"w": torch.arange(1000.0)}, buffer)
        >>> data = bytearray(buffer.getvalue())
        >>> verify_archive(bytes(data), "ckpt.pt")  # intact: no error
        >>> start = data.find(torch.arange(1000.0).numpy().tobytes())
        >>> data[start + 100] ^= 1  # one flipped bit in the tensor's data
        >>> verify_archive(bytes(data), "ckpt.pt")
        Traceback (most recent call last):
        ...
        gradcomp.checkpoint.CorruptArchiveError: ckpt.pt is corrupt: entry '.../data/0' does not match the CRC-32 ...
    """
    name = name or str(source)
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    if not zipfile.is_zipfile(handle):
        return
    try:
        with zipfile.ZipFile(handle) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise CorruptArchiveError(name, f"its zip archive does not read back ({exc})") from exc
    if bad is not None:
        raise CorruptArchiveError(name, f"entry {bad!r} does not match the CRC-32 written with it (damaged bytes)")


def _encode(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _decode(data: bytes, map_location: Any = None, name: str = "gradcomp checkpoint entry") -> Any:
    verify_archive(data, name)
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


# ------------------------------------------------------------------ torch.distributed.checkpoint


class RankState:
    """This rank's gradcomp state as a DCP ``Stateful``: every rank saves and loads its own.

    Put it beside the model and optimizer in the state dict given to ``dcp.save`` and ``dcp.load``.  Its
    ``state_dict()`` is ``{"meta": <fingerprint>, "rank<r>": <this rank's state>}``, both as ``bytes``:

    * the key ``rank<r>`` (``r`` this rank in ``process_group``) differs on every rank, so DCP's save
      planner, which keeps one copy of entries saved under the same key, keeps every rank's;
    * a non-tensor entry is written with ``torch.save`` and read back whole, replacing the template's
      value (``DefaultSavePlanner.transform_object``, ``DefaultLoadPlanner.load_bytes``).  So a process
      whose memory does not exist yet (it is made at the first step) loads it all the same; tensor
      entries would need a template of the right names and shapes;
    * ``meta`` is the same on every rank (saved once): the number of ranks, ``method.config()`` and,
      when ``model`` is given (or the state has ``params``), every parameter's name, shape and dtype.

    ``load_state_dict`` compares ``meta`` with this run before it touches anything and raises a one-line
    :class:`ValueError` naming the difference ("gradcomp checkpoint saved by 4 ranks, this run has 2",
    another density, another model).  One case never reaches it: a checkpoint saved by *fewer* ranks than
    this run has no entry for the extra ranks, so DCP's load planner stops every rank first, before any
    data of any entry is read, with a ``CheckpointException`` that names each missing rank's entry
    (``Missing key in checkpoint state_dict: gradcomp.rank2.``).  ``allow_partial_load=True`` would let
    this class say "saved by 2 ranks, this run has 4" instead, but it is an argument of the load planner,
    not of ``dcp.load``, and it would let missing model entries pass silently too.

    The entries of the same ``dcp.load`` (model, optimizer) are read before ``load_state_dict`` runs;
    a refused checkpoint leaves the gradcomp state as it was, not necessarily the others.  ``dcp.load``
    calls ``state_dict()`` for its template too, which serializes the current state once (next to
    nothing before the first step).

    Args:
        state: this rank's gradcomp state: a :class:`~gradcomp.HookState` (as
            :func:`~gradcomp.register_ddp_hook` returns), a :class:`~gradcomp.DistributedOptimizer`, or
            anything with ``state_dict()`` / ``load_state_dict()`` holding tensors and plain values.
        model: the model whose parameter names key the memory (the DDP model or its module, or a
            ``{name: tensor}`` mapping).  Its parameters' names, shapes and dtypes are saved and compared
            at load; without it (and without ``state.params``) they are not checked.
        process_group: the group passed to ``dcp.save`` / ``dcp.load`` (None: the default group); ranks
            are numbered in it.
        map_location: where loaded tensors go, as in :func:`torch.load`.  Default: the device of
            ``model``'s parameters when ``model`` is given (gradcomp's memory lives beside them), else the
            device each tensor was saved from.

    Raises:
        TypeError: ``state`` has no ``state_dict()`` or no ``load_state_dict()``.

    Example:
        On every rank of a ``torchrun`` job (not run here: ``dcp`` takes seconds to import):

        .. code-block:: python

            import torch.distributed.checkpoint as dcp
            from gradcomp.checkpoint import RankState

            state = gradcomp.register_ddp_hook(ddp, gradcomp.DGC(density=0.01))
            dcp.save({"model": ..., "optim": ..., "gradcomp": RankState(state, model=ddp)}, checkpoint_id=path)
            # later, in a fresh process, before the first step:
            dcp.load({"model": ..., "optim": ..., "gradcomp": RankState(state, model=ddp)}, checkpoint_id=path)
    """

    def __init__(self, state: Any, *, model: nn.Module | Mapping[str, Tensor] | None = None,
                 process_group: dist.ProcessGroup | None = None, map_location: Any = None) -> None:
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(state, method, None)):
                raise TypeError(f"RankState needs an object with {method}(), got {type(state).__name__}")
        self.state = state
        self.model = model
        self.process_group = process_group
        self.map_location = map_location

    @property
    def key(self) -> str:
        """This rank's entry: ``rank<r>``."""
        return f"rank{_rank_and_world(self.process_group)[0]}"

    def _current(self) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
        params = _named_parameters(self.state, self.model)
        return _fingerprint(self.state, params, _rank_and_world(self.process_group)[1]), params

    def state_dict(self) -> dict[str, bytes]:
        """``{"meta": bytes, "rank<r>": bytes}``: the fingerprint, and this rank's state serialized now
        (a snapshot: training may go on while ``dcp.async_save`` writes it).

        Returns:
            dict: two ``bytes`` entries, each readable with ``torch.load(weights_only=True)``.
        """
        rank, world = _rank_and_world(self.process_group)
        meta, _ = self._current()
        return {"meta": _encode(meta),
                self.key: _encode({"rank": rank, "world_size": world, "state": self.state.state_dict()})}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Check the saved fingerprint against this run, then load this rank's own state into ``state``.

        Args:
            state_dict: what ``dcp.load`` read into :meth:`state_dict`'s template.

        Raises:
            ValueError: the checkpoint was saved by another number of ranks, with another method
                configuration or for another model (the message names the difference); the state is
                left as it was.
        """
        current, params = self._current()
        _check(_decode(state_dict["meta"], name="gradcomp checkpoint entry 'meta'"), current, "", _NOT_LOADED)
        rank, _ = _rank_and_world(self.process_group)
        location = self.map_location if self.map_location is not None else _device_of(params)
        payload = _decode(state_dict[self.key], location, f"gradcomp checkpoint entry {self.key!r}")
        if payload["rank"] != rank:
            raise ValueError(f"gradcomp checkpoint entry {self.key!r} holds rank {payload['rank']}'s state; "
                             f"{_NOT_LOADED}")
        self.state.load_state_dict(payload["state"])
        log.info("rank %d: gradcomp state loaded from its own checkpoint entry", rank)


# ------------------------------------------------------------------ one file per rank (Accelerate, plain loops)


def rank_file(directory: str | os.PathLike, rank: int) -> Path:
    """The file that holds rank ``rank``'s gradcomp state in ``directory``.

    Args:
        directory: the checkpoint directory.
        rank: the rank.

    Returns:
        ``directory / f"gradcomp_rank{rank}.pt"``.

    Example:
        >>> from gradcomp.checkpoint import rank_file
        >>> rank_file("ckpt/step_100", 3).as_posix()
        'ckpt/step_100/gradcomp_rank3.pt'
    """
    return Path(directory) / f"gradcomp_rank{rank}.pt"


def save_rank_state(state: Any, directory: str | os.PathLike, *,
                    model: nn.Module | Mapping[str, Tensor] | None = None,
                    process_group: dist.ProcessGroup | None = None) -> Path:
    """Write this rank's gradcomp state to its own file in ``directory``; call it on every rank.

    The file (:func:`rank_file`) holds plain dicts of tensors and plain values (``torch.load(...,
    weights_only=True)`` reads it): ``{"meta": fingerprint, "rank": r, "state": state.state_dict()}``.
    It is written to a temporary name and renamed, so a crash never leaves half a file.  No collective.

    Args:
        state: this rank's gradcomp state (see :class:`RankState`).
        directory: the checkpoint directory (created if missing).
        model: the model whose parameter names key the memory (see :class:`RankState`).
        process_group: ranks are numbered in this group (None: the default group).

    Returns:
        Path: the file written.

    Example:
        Save, then load into a fresh optimizer, in a process group of one (a ``torchrun`` job's ranks each run
        the same lines, without the first and last):

        >>> import tempfile, torch, torch.distributed as dist, gradcomp
        >>> from gradcomp.checkpoint import load_rank_state, save_rank_state
        >>> from gradcomp.launch import free_port
        >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        >>> model = torch.nn.Linear(8, 2)
        >>> def optimizer(method):
        ...     return gradcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                          model.named_parameters(), method)
        >>> opt = optimizer("topk")
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step()
        >>> directory = tempfile.mkdtemp()
        >>> save_rank_state(opt, directory, model=model).name
        'gradcomp_rank0.pt'
        >>> resumed = optimizer("topk")
        >>> load_rank_state(resumed, directory, model=model)
        >>> resumed.steps
        1
        >>> load_rank_state(optimizer("qsgd"), directory, model=model)
        Traceback (most recent call last):
        ...
        ValueError: gradcomp checkpoint ... saved with method 'topk', this run uses 'qsgd'; nothing was loaded
        >>> for o in (opt, resumed):
        ...     o.remove_hooks()
        >>> dist.destroy_process_group()
    """
    rank, world = _rank_and_world(process_group)
    params = _named_parameters(state, model)
    path = rank_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save({"meta": _fingerprint(state, params, world), "rank": rank, "state": state.state_dict()}, partial)
    os.replace(partial, path)
    log.info("rank %d: gradcomp state saved to %s", rank, path)
    return path


def load_rank_state(state: Any, directory: str | os.PathLike, *,
                    model: nn.Module | Mapping[str, Tensor] | None = None,
                    process_group: dist.ProcessGroup | None = None, map_location: Any = None) -> None:
    """Load this rank's own gradcomp state from ``directory`` (written by :func:`save_rank_state`).

    The saved fingerprint is compared with this run first; nothing is loaded unless it fits.  Every rank
    checks its own file (each holds the fingerprint), without collectives, so a refused checkpoint fails
    every rank alike and none waits for another.

    Args:
        state: this rank's gradcomp state (see :class:`RankState`).
        directory: the checkpoint directory.
        model: the model whose parameter names key the memory (see :class:`RankState`).
        process_group: ranks are numbered in this group (None: the default group).
        map_location: as in :class:`RankState`.

    Raises:
        ValueError: ``directory`` holds no gradcomp state, or one saved by another number of ranks, with
            another method configuration or for another model (the message names the difference); the
            state is left as it was.

    Example:
        See :func:`save_rank_state`.
    """
    rank, world = _rank_and_world(process_group)
    params = _named_parameters(state, model)
    path = rank_file(directory, rank)
    if not path.is_file():
        saved = sorted(int(m[1]) for m in map(_RANK_FILE.match, os.listdir(directory)) if m) \
            if Path(directory).is_dir() else []
        if not saved:
            raise ValueError(f"gradcomp checkpoint {directory} holds no gradcomp state (no gradcomp_rank*.pt)")
        raise ValueError(f"gradcomp checkpoint {directory} saved by {_ranks(len(saved))}, this run has {world} "
                         f"(no {path.name}); nothing was loaded")
    location = map_location if map_location is not None else _device_of(params)
    verify_archive(path)
    saved = torch.load(path, map_location=location, weights_only=True)
    _check(saved["meta"], _fingerprint(state, params, world), f" {directory}", "nothing was loaded")
    if saved["rank"] != rank:
        raise ValueError(f"{path} holds rank {saved['rank']}'s state; nothing was loaded")
    state.load_state_dict(saved["state"])
    log.info("rank %d: gradcomp state loaded from %s", rank, path)


def register_with_accelerate(accelerator: Any, state: Any, *, model: nn.Module | None = None,
                             process_group: dist.ProcessGroup | None = None, map_location: Any = None) -> tuple:
    """Make ``accelerator.save_state`` / ``load_state`` save and restore every rank's own gradcomp state.

    Registers a save-state and a load-state pre-hook (``Accelerator.register_save_state_pre_hook`` /
    ``register_load_state_pre_hook``), which Accelerate calls on every rank: each rank writes
    :func:`rank_file` in the checkpoint directory (:func:`save_rank_state`) and reads its own back
    (:func:`load_rank_state`).  The load hook runs before Accelerate loads the model and optimizer, so a
    checkpoint that does not fit is refused before anything is loaded.  Do not use
    ``register_for_checkpointing`` for gradcomp's state: Accelerate writes the main process's copy only
    and gives it to every rank.

    Under ``accelerate launch`` on CPU, start the processes with ``--multi_gpu --num_processes N`` and
    ``ACCELERATE_USE_CPU=true`` (or ``Accelerator(cpu=True)``): ``--cpu --num_processes N`` alone starts a
    single process (Accelerate's simple launcher, whose multi-CPU mode needs ``mpirun``).  Under
    ``torchrun``, the same environment variable (or ``cpu=True``) makes Accelerate join with gloo.

    Args:
        accelerator: an ``accelerate.Accelerator`` (accelerate itself is not imported here).
        state: this rank's gradcomp state, e.g. ``gradcomp.register_ddp_hook(model, method)`` on the model
            ``accelerator.prepare`` returned.
        model: the model whose parameter names key the memory; default: the model Accelerate hands its
            hooks when it manages exactly one (else parameters are not checked).
        process_group: ranks are numbered in this group (None: the default group).
        map_location: as in :class:`RankState`.

    Returns:
        tuple: the two hooks' ``RemovableHandle`` (save, load).

    Example:
        On every rank, under ``accelerate launch`` (not run here):

        .. code-block:: python

            model, optimizer = accelerator.prepare(model, optimizer)
            state = gradcomp.register_ddp_hook(model, gradcomp.DGC(density=0.01))
            register_with_accelerate(accelerator, state)
            accelerator.save_state("ckpt")  # ... later, in a fresh run: accelerator.load_state("ckpt")
    """

    def which(models: list) -> nn.Module | None:
        return model if model is not None else (models[0] if len(models) == 1 else None)

    def save(models: list, weights: list, output_dir: str) -> None:
        save_rank_state(state, output_dir, model=which(models), process_group=process_group)

    def load(models: list, input_dir: str) -> None:
        load_rank_state(state, input_dir, model=which(models), process_group=process_group,
                        map_location=map_location)

    return accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load)
