"""gradcomp: Deep Gradient Compression and the methods around it, for PyTorch data parallelism."""

from .compressors import Compressor, Payload, available, get, register
from .ddp_hook import HookState, ddp_comm_hook, register_ddp_hook
from .dga import DelayedGradientAveraging, FedAvg
from .guard import SettingsMismatchError
from .launch import shutdown
from .memory import DGCMemory, Memory, Momentum, Residual
from .method import DGC, Method, NonFiniteGradientError, as_method, sgd_settings
from .optim import DistributedOptimizer
from .schedule import LinearLRWarmup, SparsityWarmup
from .simulator import Simulator, split_batch

__version__ = "0.1.0"

__all__ = [
    "Compressor",
    "DGC",
    "DGCMemory",
    "DelayedGradientAveraging",
    "DistributedOptimizer",
    "FedAvg",
    "HookState",
    "LinearLRWarmup",
    "Memory",
    "Method",
    "Momentum",
    "NonFiniteGradientError",
    "Payload",
    "Residual",
    "SettingsMismatchError",
    "Simulator",
    "SparsityWarmup",
    "__version__",
    "as_method",
    "available",
    "ddp_comm_hook",
    "get",
    "register",
    "register_ddp_hook",
    "sgd_settings",
    "shutdown",
    "split_batch",
]
