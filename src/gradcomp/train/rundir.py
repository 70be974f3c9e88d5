"""The run directory of ``gradcomp train``: its files, written atomically, and reading them back.

A run directory holds everything one training run leaves behind::

    run/
      config.json      the resolved config                     RunDir.write_config / read_config
      metrics.jsonl    one JSON object per epoch, appended      RunDir.append_metrics / read_metrics
      checkpoint.pt    latest state, replaced atomically        RunDir.save_checkpoint / load_checkpoint
      checkpoint.prev.pt  the checkpoint saved before it (kept at each save: a damaged latest file still
                       leaves a good one)
      summary.json     final summary                            RunDir.write_summary / read_summary
      curves.png       training curves                          plot_run

Only one process (rank 0) writes a run directory.  Every file that is
rewritten (config, summary, checkpoint, metrics on truncation) is written to a
temporary file in the same directory, fsynced and moved into place with
``os.replace``, so a crash leaves either the old file or the new one, never a
mix.  Metric records are appended and fsynced one by one; a crash in the middle
of an append leaves at most a partial last line, which :meth:`RunDir.read_metrics`
skips with a warning and the next append or truncation removes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..checkpoint import CorruptArchiveError, verify_archive

__all__ = ["RunDir", "atomic_write", "json_default"]

logger = logging.getLogger(__name__)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint.prev.pt"
SUMMARY = "summary.json"
CURVES = "curves.png"


# ---------------------------------------------------------------- file helpers

def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default``: plain values for numpy / torch scalars, paths and sets, so callers may pass
    ``loss.item()`` or not.

    Args:
        obj: what ``json`` could not write.

    Returns:
        A plain value ``json`` can write.

    Raises:
        TypeError: ``obj`` is none of those (``json.dumps`` passes it on).

    Example:
        >>> import json, torch
        >>> from gradcomp.train.rundir import json_default
        >>> json.dumps({"loss": torch.tensor(0.5)}, default=json_default)
        '{"loss": 0.5}'
    """
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    item = getattr(obj, "item", None)
    if callable(item):
        numel = getattr(obj, "numel", None) or getattr(obj, "size", None)
        count = numel() if callable(numel) else numel
        if count in (None, 1):
            return item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON-serialisable")


def _dumps(obj: Any, what: str, **kwargs: Any) -> str:
    try:
        return json.dumps(obj, default=json_default, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object],
                 before_replace: Callable[[], object] | None = None) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file beside it, which is synced and then
    moved into place.

    On any error the temporary file is removed and ``path`` is left as it was.  A full device raises
    ``OSError(ENOSPC)`` naming ``path``, also where torch's writer reports it only as "unexpected pos".

    Args:
        path: the file to write (its folder must exist).
        write: called with the temporary file, open for binary writing.
        before_replace: called once the new file is complete, just before it replaces ``path``.

    Raises:
        OSError: the file could not be written (``ENOSPC`` where the device is full).
        Exception: whatever ``write`` or ``before_replace`` raises, once the temporary file is removed.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from gradcomp.train.rundir import atomic_write
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write(target, lambda f: f.write(b"kept whole"))
        >>> def fails(f):
        ...     f.write(b"half")
        ...     raise RuntimeError("the writer failed")
        >>> atomic_write(str(target), fails)
        Traceback (most recent call last):
        ...
        RuntimeError: the writer failed
        >>> target.read_text(), [p.name for p in target.parent.iterdir()]  # as it was, no temporary file left
        ('kept whole', ['note.txt'])
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        _raise_no_space(error, path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        _raise_no_space(error, path)
        raise
    _fsync_dir(path.parent)


def _raise_no_space(error: BaseException, path: Path) -> None:
    """Where ``error`` says the device is full (ENOSPC, or torch's zip writer's "unexpected pos", which is how a
    short write of ``torch.save`` surfaces), raise an ``OSError(ENOSPC)`` naming ``path`` from it."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not full and not (isinstance(error, RuntimeError) and "unexpected pos" in str(error)):
        return
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free on that device"
    except OSError:
        free = "free space unknown"
    raise OSError(errno.ENOSPC, f"no space left on device: could not write {str(path)!r} ({free}; what the "
                                f"file held before is kept)") from error


#: the temporary files :func:`atomic_write` makes beside each file of a run directory (removed on error, but
#: left behind by a process killed while writing): ``.NAME.XXXXXXXX.tmp``, and ``.checkpoint.prev.pt.tmp``
_TEMPORARY = re.compile(r"\.(config\.json|metrics\.jsonl|checkpoint\.pt|summary\.json|curves\.png)\.[^/]+\.tmp"
                        r"|\.checkpoint\.prev\.pt\.tmp")


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------- run directory

class RunDir:
    """The files of one training run (see the module docstring for the layout).

    ``RunDir(path)`` only names the directory; :meth:`create` makes it.

    Args:
        path: the run directory.

    Example:
        >>> import tempfile, torch
        >>> from gradcomp.train.rundir import RunDir
        >>> run = RunDir.create(tempfile.mkdtemp() + "/run")
        >>> run.write_config({"method": "dgc", "method_options": {"density": 0.001}, "workers": 4})
        >>> for epoch, loss in ((1, 0.5), (2, 0.25)):
        ...     run.append_metrics({"epoch": epoch, "train_loss": loss})
        >>> run.save_checkpoint({"epoch": 2, "weights": torch.ones(2)})
        >>> run.load_checkpoint()["epoch"], run.read_config()["workers"]
        (2, 4)
        >>> run.truncate_metrics(after_epoch=1), run.read_metrics()  # on resume from epoch 1
        (1, [{'epoch': 1, 'train_loss': 0.5}])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike[str], exist_ok: bool = False) -> RunDir:
        """Make the run directory (and its parents).

        Raises ``FileExistsError`` naming ``path`` when it exists and is not an
        empty directory, unless ``exist_ok`` (used to resume into it) or it
        holds nothing a run has made yet (:meth:`started` is False: a run that
        failed before its first checkpoint), which is then started again.

        Args:
            path: the run directory.
            exist_ok: accept one a run has started (to resume into it).

        Returns:
            The :class:`RunDir`.

        Raises:
            FileExistsError: ``path`` is not a directory, or (without ``exist_ok``) holds a started run.
        """
        p = Path(path)
        if p.exists():
            if not p.is_dir():
                raise FileExistsError(f"run directory {str(p)!r} exists and is not a directory")
            if not exist_ok and cls(p).started():
                raise FileExistsError(f"run directory {str(p)!r} already exists and is not empty "
                                      f"(resume into it, or choose another directory)")
        p.mkdir(parents=True, exist_ok=True)
        return cls(p)

    def started(self) -> bool:
        """Whether the directory holds anything of value: a checkpoint, a summary, or any file that is not a
        config, metrics or a temporary file left by an interrupted write (what a run that failed before its
        first checkpoint leaves behind, made again by starting it again).

        Returns:
            True when it does; False too when the directory does not exist.
        """
        try:
            names = [e.name for e in os.scandir(self.path)]
        except FileNotFoundError:
            return False
        return any(n not in (CONFIG, METRICS) and not _TEMPORARY.fullmatch(n) for n in names)

    def remove_temporaries(self) -> list[str]:
        """Remove the temporary files left behind by writes of a killed process (``.checkpoint.pt.*.tmp`` and
        the like: see :func:`atomic_write`).  Only while no other process writes here.

        Returns:
            The names of the files removed, sorted.
        """
        removed = []
        for entry in os.scandir(self.path):
            if _TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.name)
        if removed:
            logger.info("%s: removed %d temporary file(s) left by interrupted writes: %s", self.path, len(removed),
                        ", ".join(sorted(removed)))
        return sorted(removed)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # paths
    @property
    def config_path(self) -> Path:
        """``config.json`` in the directory."""
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl`` in the directory."""
        return self.path / METRICS

    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.pt`` in the directory."""
        return self.path / CHECKPOINT

    @property
    def prev_checkpoint_path(self) -> Path:
        """``checkpoint.prev.pt`` in the directory: the checkpoint saved before the latest."""
        return self.path / PREV_CHECKPOINT

    @property
    def summary_path(self) -> Path:
        """``summary.json`` in the directory."""
        return self.path / SUMMARY

    @property
    def curves_path(self) -> Path:
        """``curves.png`` in the directory."""
        return self.path / CURVES

    @property
    def name(self) -> str:
        """The directory's name (of its resolved path)."""
        return self.path.resolve().name or str(self.path)

    # config and summary
    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write the resolved config to ``config.json``, atomically.

        Args:
            config: a JSON-serialisable dict (numpy and torch scalars and paths are turned into plain values).

        Raises:
            TypeError: a value is not JSON-serialisable.
            OSError: the file cannot be written (``ENOSPC`` naming it when the device is full); the old one
                is kept.
        """
        _atomic_write_text(self.config_path, _dumps(dict(config), "config", indent=2) + "\n")

    def read_config(self) -> dict[str, Any]:
        """Read ``config.json``.

        Returns:
            The config.

        Raises:
            FileNotFoundError: there is none.
            ValueError: it is not valid JSON, or not a JSON object.
        """
        return self._read_json(self.config_path, "config")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write the final summary to ``summary.json``, atomically.

        Args:
            summary: a JSON-serialisable dict (keys: module docstring).

        Raises:
            TypeError: a value is not JSON-serialisable.
            OSError: the file cannot be written; the old one is kept.
        """
        _atomic_write_text(self.summary_path, _dumps(dict(summary), "summary", indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        """Read ``summary.json``.

        Returns:
            The summary.

        Raises:
            FileNotFoundError: there is none (the run has not finished).
            ValueError: it is not valid JSON, or not a JSON object.
        """
        return self._read_json(self.summary_path, "summary")

    @staticmethod
    def _read_json(path: Path, what: str) -> dict[str, Any]:
        if not path.is_file():
            raise FileNotFoundError(f"no {what} file at {str(path)!r}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} file {str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{what} file {str(path)!r} must hold a JSON object, got {type(data).__name__}")
        return data

    # metrics
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line, flushed and fsynced before returning.

        A partial last line left by an earlier crash is cut off first, so it
        never glues onto the new record.

        Args:
            record: one epoch's metrics, JSON-serialisable (keys: module docstring).

        Raises:
            TypeError: a value is not JSON-serialisable.
            OSError: the line cannot be written (``ENOSPC`` naming the file when the device is full).
        """
        line = _dumps(dict(record), "metrics record") + "\n"
        self._drop_partial_tail()
        try:
            with open(self.metrics_path, "ab") as f:
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:  # a part of the line may be written: the next append or truncation cuts it off
            _raise_no_space(error, self.metrics_path)
            raise

    def _drop_partial_tail(self) -> None:
        """Cut off an unreadable last line (a crash mid-append, or zeros after a power loss)."""
        path = self.metrics_path
        try:
            content = path.read_bytes()  # one line per epoch: small
        except FileNotFoundError:
            return
        body = content.rstrip(b"\n")
        if not body:
            return
        start = body.rfind(b"\n") + 1
        try:
            json.loads(body[start:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            pass
        else:  # readable: at most its newline is missing
            if not content.endswith(b"\n"):
                with open(path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
            return
        logger.warning("%s: cutting off an unreadable last line (%d bytes) left by an interrupted write",
                       path, len(content) - start)
        with open(path, "rb+") as f:
            f.truncate(start)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records, in order; ``[]`` when there are none.

        An unreadable *last* line (a crash mid-append) is skipped with a logged
        warning; an unreadable line before it is real corruption and raises
        ``ValueError`` naming the file and line.

        Returns:
            The records, each a dict.

        Raises:
            ValueError: a line before the last is not a JSON object.
        """
        path = self.metrics_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        lines = raw.split(b"\n")
        numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
        records: list[dict[str, Any]] = []
        for pos, (lineno, line) in enumerate(numbered):
            last = pos == len(numbered) - 1
            try:
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except (UnicodeDecodeError, ValueError) as exc:
                if last:
                    logger.warning("%s: ignoring unreadable last line %d (interrupted write?): %s",
                                   path, lineno, exc)
                    break
                raise ValueError(f"metrics file {str(path)!r} line {lineno} is corrupt: {exc}") from exc
            records.append(record)
        return records

    def truncate_metrics(self, after_epoch: int) -> int:
        """Keep only records with ``epoch <= after_epoch`` (rewritten atomically); return how many were dropped.

        Called on resume with the checkpoint's epoch, so epochs trained after
        the checkpoint (and any partial last line) are not counted twice.

        Args:
            after_epoch: the last epoch to keep.

        Returns:
            How many records were dropped.

        Raises:
            ValueError: a record has no ``epoch``, or a line before the last is corrupt.
        """
        records = self.read_metrics()
        kept = []
        for i, record in enumerate(records):
            if "epoch" not in record:
                raise ValueError(f"metrics file {str(self.metrics_path)!r}: record {i + 1} has no 'epoch'")
            if record["epoch"] <= after_epoch:
                kept.append(record)
        text = "".join(_dumps(r, "metrics record") + "\n" for r in kept)
        if self.metrics_path.exists() or kept:
            _atomic_write_text(self.metrics_path, text)
        dropped = len(records) - len(kept)
        if dropped:
            logger.info("%s: dropped %d record(s) after epoch %s", self.metrics_path, dropped, after_epoch)
        return dropped

    # checkpoint
    def has_checkpoint(self) -> bool:
        """Whether ``checkpoint.pt`` exists.

        Returns:
            True when it is a file.
        """
        return self.checkpoint_path.is_file()

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Save ``state`` (tensors and plain values only) to ``checkpoint.pt`` atomically.

        Written to a temporary file in the run directory, fsynced, then moved
        over the old checkpoint with ``os.replace``: a crash at any point
        leaves the previous checkpoint loadable.  Once the new file is
        complete, the checkpoint it replaces is kept as ``checkpoint.prev.pt``
        (a hard link, or a copy where links are not supported), so a latest
        file damaged later still leaves the one before it.

        Args:
            state: tensors and plain values (what ``torch.load(weights_only=True)`` reads back).

        Raises:
            OSError: the file cannot be written (``ENOSPC`` naming it when the device is full); the old
                checkpoint is kept.
        """
        atomic_write(self.checkpoint_path, lambda f: torch.save(dict(state), f), self._keep_previous)

    def _keep_previous(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        tmp = self.path / f".{PREV_CHECKPOINT}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.checkpoint_path, tmp)
        except OSError:
            shutil.copyfile(self.checkpoint_path, tmp)
        os.replace(tmp, self.prev_checkpoint_path)

    def load_checkpoint(self, map_location: Any = "cpu") -> dict[str, Any]:
        """Load ``checkpoint.pt`` with ``torch.load(weights_only=True)``.

        Every byte is checked first against the CRC-32 that ``torch.save``
        wrote for each entry of its zip archive (``torch.load`` does not), so
        a flipped bit or a zeroed block in a tensor's data is refused, not
        trained on.  Raises ``FileNotFoundError`` when there is none and
        ``ValueError`` naming the file when it is truncated, corrupt, or holds
        objects that ``weights_only`` refuses (the original exception is
        chained); where ``checkpoint.prev.pt`` exists the message says how to
        resume from it instead (nothing is moved without the user).

        Args:
            map_location: where the tensors go, as in :func:`torch.load`.

        Returns:
            The state saved.

        Raises:
            FileNotFoundError: there is no checkpoint.
            ValueError: it is truncated, corrupt, holds objects ``weights_only`` refuses, or is not a dict.
        """
        path = self.checkpoint_path
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
        with open(path, "rb"):  # permission problems surface as themselves, not as "corrupt"
            pass
        try:
            verify_archive(path)  # every entry's CRC-32: torch.load does not check them
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if isinstance(exc, CorruptArchiveError):
                reason, detail = "is corrupt", exc.detail
            elif isinstance(exc, pickle.UnpicklingError) and zipfile.is_zipfile(path):
                reason = ("holds objects that torch.load(weights_only=True) refuses; "
                          "a checkpoint must hold only tensors and plain values")
            else:
                reason = "is truncated or corrupt"
            prev = self.prev_checkpoint_path
            hint = (f"; the checkpoint saved before it is kept: to resume from it, move {str(prev)!r} to "
                    f"{str(path)!r}" if prev.is_file() else "")
            raise ValueError(f"checkpoint {str(path)!r} {reason}: {detail}{hint}") from exc
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict")
        return state
