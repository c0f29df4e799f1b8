"""TorchTitan 0.3.0 on the torch it meets: the six patches of DESIGN.md §3, in one place.

`apply()` runs once, from `titan_rw/__init__.py`, before any torchtitan import. It imports
no torchtitan module itself: patches that must touch a torchtitan module are installed
as post-import hooks (a `sys.meta_path` finder that runs the patch right after the
module's own code, before anyone can bind its names with `from ... import`). Each patch
is guarded and does nothing where it is not needed:

1. ``triton_stub``      triton is not importable → stub the one leaf module that imports it
                         at import time (`torchtitan.distributed.minimal_async_ep.kernels`);
                         calling any of its kernels raises a clear error.
2. ``cpu_device``       no accelerator → `torchtitan.tools.utils.device_type = "cpu"` and a
                         device module answering what TorchTitan asks of `torch.cuda`.
3. ``set_timeout``      torch lacks `torch.distributed.set_timeout` (2.13) → alias it to
                         `_set_pg_timeout` (not CPU-specific).
4. ``sdpa_attention``   no CUDA → FlexAttention has no CPU backward; models use SDPA with the
                         same document-causal mask as a boolean tensor (`attention_backend()`,
                         read by `titan_rw.models`).
5. ``partial_dtensor``  torch < 2.14 → `ParallelismConfig.spmd_backend` defaults to
                         "partial_dtensor" (the "spmd_types" default fails with FSDP on 2.13).
6. ``force_sum_reduce`` no accelerator (gloo has no PREMUL_SUM) → after TorchTitan disables
                         FSDP's gradient division, also force SUM reductions for comms.

`applied_patches()` lists the names applied; one INFO line names them.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from collections.abc import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger("titan_rw")

_TRITON_LEAF = "torchtitan.distributed.minimal_async_ep.kernels"
_applied: list[str] = []
_hooks: dict[str, list[Callable[[types.ModuleType], None]]] = {}
_done = False


def applied_patches() -> tuple[str, ...]:
    """Names of the patches `apply()` installed in this process, in order."""
    return tuple(_applied)


# ----------------------------------------------------------------------------- guards
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def has_accelerator() -> bool:
    """What TorchTitan's own `get_device_info` sees (cuda, xpu, mps, ...)."""
    return torch._utils._get_available_device_type() is not None


def has_cuda() -> bool:
    return torch.cuda.is_available()


def torch_before(major: int, minor: int) -> bool:
    v = torch.__version__.split("+")[0].split(".")
    try:
        return (int(v[0]), int(v[1])) < (major, minor)
    except (ValueError, IndexError):
        return False


def attention_backend() -> str | None:
    """Patch 4: "sdpa" where FlexAttention cannot run backward (no CUDA), else None
    (TorchTitan's GPU default)."""
    return None if has_cuda() else "sdpa"


# --------------------------------------------------------------------- post-import hooks
class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs registered patches right after a module's code executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner, fullname):
        self._inner, self._name = inner, fullname

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _run_hooks(self._name, module)

    def __getattr__(self, item):  # get_source, get_code, ... for tracebacks/inspect
        return getattr(self._inner, item)


def _run_hooks(name: str, module: types.ModuleType) -> None:
    for fn in _hooks.get(name, []):
        fn(module)


def _after_import(name: str, fn: Callable[[types.ModuleType], None]) -> None:
    if name in sys.modules:  # imported before titan_rw: patch now (may be too late for binders)
        if name.startswith("torchtitan."):
            logger.warning("titan_rw.compat: %s was imported before titan_rw; import titan_rw first", name)
        fn(sys.modules[name])
        return
    _hooks.setdefault(name, []).append(fn)
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


# ------------------------------------------------------------------------------ patch 1
def _triton_stub_module() -> types.ModuleType:
    mod = types.ModuleType(_TRITON_LEAF)
    mod.__file__ = __file__
    mod.__titan_rw_stub__ = True

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _missing(*args, **kwargs):
            raise RuntimeError(
                f"{_TRITON_LEAF}.{name} needs triton, which is not installed "
                "(titan_rw.compat stubbed this module; minimal-async expert parallelism is unavailable)"
            )

        _missing.__name__ = name
        return _missing

    mod.__getattr__ = __getattr__
    return mod


def _patch_triton_stub() -> bool:
    if triton_available() or _TRITON_LEAF in sys.modules:
        return False
    sys.modules[_TRITON_LEAF] = _triton_stub_module()
    return True


# ------------------------------------------------------------------------------ patch 2
class CpuDeviceModule(types.ModuleType):
    """`torch.cpu` plus what TorchTitan asks of a device module (metrics, barriers)."""

    def __init__(self):
        super().__init__("titan_rw.compat.cpu_device")
        self.__file__ = __file__

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        # barrier(device_ids=[current_device()]) needs an int.
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device) -> None:
        return None

    @staticmethod
    def synchronize(device=None) -> None:
        return None

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def get_device_name(device=None) -> str:
        import platform

        return platform.processor() or platform.machine() or "cpu"

    @staticmethod
    def get_device_properties(device=None):
        try:
            import os

            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 1 << 34
        return types.SimpleNamespace(name="cpu", total_memory=total)

    @staticmethod
    def memory_stats(device=None) -> dict:
        return {}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None


cpu_device_module = CpuDeviceModule()


def _set_cpu_device(mod: types.ModuleType) -> None:
    mod.device_type = "cpu"
    mod.device_module = cpu_device_module
    mod.get_device_info = lambda: ("cpu", cpu_device_module)


def _patch_cpu_device() -> bool:
    if has_accelerator():
        return False
    _after_import("torchtitan.tools.utils", _set_cpu_device)
    return True


# ------------------------------------------------------------------------------ patch 3
def _set_timeout(timeout, group=None) -> None:
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timeout, group)


def _patch_set_timeout() -> bool:
    if hasattr(dist, "set_timeout") or not hasattr(dist.distributed_c10d, "_set_pg_timeout"):
        return False
    dist.set_timeout = _set_timeout
    return True


# ------------------------------------------------------------------------------ patch 4
def _patch_sdpa_attention() -> bool:
    return attention_backend() == "sdpa"


# ------------------------------------------------------------------------------ patch 5
def _default_partial_dtensor(mod: types.ModuleType) -> None:
    cls = mod.ParallelismConfig
    f = cls.__dataclass_fields__["spmd_backend"]
    if f.default != "spmd_types":
        return
    f.default = "partial_dtensor"
    kw = cls.__init__.__kwdefaults__
    if kw is not None and kw.get("spmd_backend") == "spmd_types":
        kw["spmd_backend"] = "partial_dtensor"


def _patch_partial_dtensor() -> bool:
    if not torch_before(2, 14):
        return False
    _after_import("torchtitan.config.configs", _default_partial_dtensor)
    return True


# ------------------------------------------------------------------------------ patch 6
def force_sum_reduction(model: torch.nn.Module) -> int:
    """Make every FSDP module reduce with SUM (gloo has no PREMUL_SUM). Returns the count."""
    from torch.distributed._composable.fsdp import FSDPModule

    n = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            n += 1
    return n


def _wrap_disable_division(mod: types.ModuleType) -> None:
    original = mod.disable_fsdp_gradient_division
    if getattr(original, "__titan_rw_patched__", False):
        return

    def disable_fsdp_gradient_division(model):
        original(model)
        force_sum_reduction(model)

    disable_fsdp_gradient_division.__titan_rw_patched__ = True
    disable_fsdp_gradient_division.__wrapped__ = original
    disable_fsdp_gradient_division.__doc__ = original.__doc__
    mod.disable_fsdp_gradient_division = disable_fsdp_gradient_division


def _patch_force_sum_reduce() -> bool:
    if has_accelerator():
        return False
    _after_import("torchtitan.distributed.fsdp", _wrap_disable_division)
    return True


_PATCHES: tuple[tuple[str, Callable[[], bool]], ...] = (
    ("triton_stub", _patch_triton_stub),
    ("cpu_device", _patch_cpu_device),
    ("set_timeout", _patch_set_timeout),
    ("sdpa_attention", _patch_sdpa_attention),
    ("partial_dtensor", _patch_partial_dtensor),
    ("force_sum_reduce", _patch_force_sum_reduce),
)


def apply() -> tuple[str, ...]:
    """Install every needed patch, once. Safe to call again (no-op)."""
    global _done
    if _done:
        return applied_patches()
    _done = True
    for name, patch in _PATCHES:
        if patch():
            _applied.append(name)
    if logging.getLogger().handlers or logger.handlers:
        log_applied()
    return applied_patches()


_logged = False


def summary() -> str:
    return f"titan_rw.compat: torch {torch.__version__}, patches applied: {', '.join(_applied) or 'none'}"


def log_applied(log: logging.Logger | None = None) -> None:
    """Log the one line naming the applied patches (once per process). `apply()` logs it
    at import when logging is configured; entry points call this after configuring it."""
    global _logged
    if not _logged:
        _logged = True
        (log or logger).info(summary())
