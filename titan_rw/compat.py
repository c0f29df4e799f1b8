"""TorchTitan 0.3.0 on the torch it meets: every compatibility patch, in one place.

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

Older torch (2.11, 2.12; TorchTitan 0.3.0 is written against 2.13):

7. ``mesh_dims_standin`` `torch.distributed.fsdp` lacks `DataParallelMeshDims` → a stand-in, so
                         TorchTitan imports; building one (only the full_dtensor / spmd_types
                         backends do, which patch 5 avoids) raises a clear error.
8. ``block_mask_kwargs`` `create_block_mask` lacks torch 2.13's `separate_full_blocks`,
                         `compute_dq_write_order`, `dq_kv_order` → a wrapper drops them at their
                         defaults (the older torch's only behaviour) and refuses other values.
                         FlexAttention, the GPU default, builds its document mask through it.
9. ``trunc_normal_2_13`` torch < 2.13 → `nn.init.trunc_normal_` samples as torch 2.13 does
                         (rejection sampling instead of the inverse CDF), so one seed gives the
                         same initial weights on both (fp32 tensors; the tiny flavor's step-1 loss
                         on torch 2.11: 8.1464 with it, as on 2.13; 8.0671 without); off with
                         TITAN_RW_TRUNC_NORMAL_2_13=0.

Lean environments (the GPU check's image: torch and the wheels of benchmarks/gpu_wheelhouse.sh):

10. ``hf_datasets_absent`` Hugging Face `datasets` is not importable → TorchTitan's HF text loader
                         module (`torchtitan.hf_datasets.text_datasets`: imported by its validator,
                         never used by titan_rw, which has its own loader) imports with placeholders
                         that raise a clear error when called. Saves `datasets`, pyarrow, pandas, ...

torchrun restarts (any torch that keeps one agent store across attempts, as 2.13 does):

11. ``restart_rendezvous`` a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) → TorchTitan's
                         `init_distributed` builds the process group on a store under a per-attempt
                         key prefix; else a restarted rank can read the previous attempt's addresses
                         ("Gloo connectFullMesh failed ... Connection refused"; ~1/3 of restarts).

`applied_patches()` lists the names applied; one INFO line names them.

Not a patch (nothing of torch or TorchTitan changes, and it is not listed): on a machine without
CUDA, `apply()` also puts a logging filter on the import-time warnings of torchao (the optional
`titan_rw[float8]` extra, which TorchTitan's quantization module imports whenever it is installed):
torchao's "Failed to load .../_C_*.so" (its CUDA kernels' libraries) and torch's "... is an Enum
subclass and is now natively supported by torch.compile" (torchao 0.18 registers its enums with
pytree). Both are said at every CPU run's start and neither is about the run (`_quiet_torchao_import`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import os
import sys
import types
import warnings
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
        with _pre_hooks(self._name):
            self._inner.exec_module(module)
        _run_hooks(self._name, module)

    def __getattr__(self, item):  # get_source, get_code, ... for tracebacks/inspect
        return getattr(self._inner, item)


def _run_hooks(name: str, module: types.ModuleType) -> None:
    for fn in _hooks.get(name, []):
        fn(module)


_pre: dict[str, list[Callable[[], contextlib.AbstractContextManager]]] = {}


@contextlib.contextmanager
def _pre_hooks(name: str):
    """Context managers registered by `_while_importing`, entered around a module's code."""
    with contextlib.ExitStack() as stack:
        for make in _pre.get(name, []):
            stack.enter_context(make())
        yield


def _while_importing(name: str, make: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Run the module `name`'s code inside `make()` (e.g. with a placeholder in sys.modules)."""
    if name in sys.modules:
        return
    _pre.setdefault(name, [])
    _pre[name].append(make)
    _hooks.setdefault(name, [])
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


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


# ------------------------------------------------------------------------------ patch 7
@dataclasses.dataclass(frozen=True)
class DataParallelMeshDims:
    """Stand-in for torch 2.13's `torch.distributed.fsdp.DataParallelMeshDims` (titan_rw.compat,
    patch 7). TorchTitan only names it in annotations and builds one for the full_dtensor /
    spmd_types backends, whose `fully_shard(dp_mesh_dims=...)` this torch does not have."""

    shard: str | tuple[str, ...] | None = None
    replicate: str | tuple[str, ...] | None = None

    def __post_init__(self):
        raise NotImplementedError(
            f"torch {torch.__version__} has no DataParallelMeshDims: its fully_shard cannot take "
            "dp_mesh_dims, which TorchTitan's full_dtensor/spmd_types backends need (torch >= 2.13). "
            "Set [parallelism] spmd_backend = \"partial_dtensor\" (titan_rw's default on torch < 2.14) "
            "or use torch 2.13."
        )


def _patch_mesh_dims_standin() -> bool:
    import torch.distributed.fsdp as fsdp

    if hasattr(fsdp, "DataParallelMeshDims"):
        return False
    DataParallelMeshDims.__titan_rw_standin__ = True
    fsdp.DataParallelMeshDims = DataParallelMeshDims
    return True


# ------------------------------------------------------------------------------ patch 8
# torch 2.13's new create_block_mask keywords and their defaults: the defaults are what
# torch 2.11/2.12 always do (full blocks stored apart, no dQ write-order metadata).
BLOCK_MASK_KWARG_DEFAULTS = {"separate_full_blocks": True, "compute_dq_write_order": False, "dq_kv_order": True}


def _tolerant_create_block_mask(original: Callable) -> Callable:
    params = list(inspect.signature(original).parameters)  # mask_mod .. _compile, in order

    def create_block_mask(*args, **kwargs):
        extra = dict(zip(BLOCK_MASK_KWARG_DEFAULTS, args[len(params):]))  # passed by position
        args = args[: len(params)]
        for key in BLOCK_MASK_KWARG_DEFAULTS:
            if key in kwargs:
                extra[key] = kwargs.pop(key)
        for key, value in extra.items():
            if value != BLOCK_MASK_KWARG_DEFAULTS[key]:
                raise NotImplementedError(
                    f"create_block_mask({key}={value!r}) needs torch >= 2.13; torch {torch.__version__} "
                    f"only does {key}={BLOCK_MASK_KWARG_DEFAULTS[key]!r} (titan_rw.compat, patch 8). "
                    "TorchTitan passes separate_full_blocks=False in batch-invariant mode: turn that off "
                    "or use torch 2.13."
                )
        return original(*args, **kwargs)

    create_block_mask.__wrapped__ = original
    create_block_mask.__doc__ = original.__doc__
    create_block_mask.__titan_rw_patched__ = True
    return create_block_mask


def _patch_block_mask_kwargs() -> bool:
    from torch.nn.attention import flex_attention

    original = flex_attention.create_block_mask
    if getattr(original, "__titan_rw_patched__", False):
        return False
    if "separate_full_blocks" in inspect.signature(original).parameters:
        return False
    # Before TorchTitan imports it (`from ... import create_block_mask`, then torch.compile of it).
    flex_attention.create_block_mask = _tolerant_create_block_mask(original)
    return True


# ------------------------------------------------------------------------------ patch 9
def _log_density_minus_peak(x: torch.Tensor, mean: float, std: float, log_peak: float) -> torch.Tensor:
    """In place: the normal's log density at x (up to its constant) minus its value at the mode."""
    return x.sub_(mean).div_(std).pow_(2).mul_(-0.5).sub_(log_peak)


def trunc_normal_2_13(tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0, generator=None):
    """`torch.nn.init.trunc_normal_` as torch 2.13 samples it, op for op (so bitwise the same draws
    from the same generator state). Where the interval holds more than 30 % of the normal's mass:
    draw normals and redraw those outside [a, b] until none is; otherwise propose uniformly on
    [a, b] and accept with the density ratio to the mode. torch 2.11/2.12 use the inverse CDF of
    a uniform draw instead: right distribution, different numbers."""
    if tensor.is_meta:
        return tensor
    if mean < a - 2 * std or mean > b + 2 * std:
        warnings.warn(
            "mean is more than 2 std from [a, b] in nn.init.trunc_normal_. "
            "The distribution of values may be incorrect.",
            stacklevel=2,
        )

    def phi(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        if phi((b - mean) / std) - phi((a - mean) / std) > 0.3:
            lo = tensor.new_tensor(a, device="cpu").item()  # the bounds in the tensor's dtype
            hi = tensor.new_tensor(b, device="cpu").item()
            draws = tensor.normal_(mean, std, generator=generator)
            while True:
                outside = (draws < lo) | (draws > hi)
                if not outside.any():
                    break
                redraw = torch.empty_like(draws).normal_(mean, std, generator=generator)
                draws = torch.where(outside, redraw, draws)
            if draws is not tensor:
                tensor.copy_(draws)
            return tensor

        mode = max(a, min(mean, b))
        log_peak = -0.5 * ((mode - mean) / std) ** 2
        proposal = torch.empty_like(tensor)
        coin = torch.empty_like(tensor)
        tensor.uniform_(a, b, generator=generator)
        proposal.copy_(tensor)
        _log_density_minus_peak(proposal, mean, std, log_peak)
        rejected = coin.uniform_(generator=generator).log_().gt(proposal)
        if rejected.any():
            result = tensor
            while True:
                proposal.uniform_(a, b, generator=generator)
                result = torch.where(rejected, proposal, result)
                _log_density_minus_peak(proposal, mean, std, log_peak)
                rejected = torch.where(rejected, coin.uniform_(generator=generator).log_().gt(proposal), rejected)
                if not rejected.any():
                    break
            tensor.copy_(result)
        return tensor


def _patch_trunc_normal_2_13() -> bool:
    if not torch_before(2, 13) or os.environ.get("TITAN_RW_TRUNC_NORMAL_2_13", "1") == "0":
        return False
    # Before TorchTitan binds it (`partial(nn.init.trunc_normal_, std=...)` at import).
    trunc_normal_2_13.__wrapped__ = torch.nn.init.trunc_normal_
    torch.nn.init.trunc_normal_ = trunc_normal_2_13
    return True


# ----------------------------------------------------------------------------- patch 10
_HF_TEXT = "torchtitan.hf_datasets.text_datasets"


def _datasets_placeholder(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = __file__
    mod.__path__ = []
    mod.__titan_rw_stub__ = True

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def _missing(*args, **kwargs):
            raise RuntimeError(
                f"{name}.{attr} needs the Hugging Face `datasets` package, which is not installed "
                f"(titan_rw.compat, patch 10: {_HF_TEXT} imported without it). TorchTitan's HF text "
                "loader and validator are unavailable; titan_rw's own loader does not need it: "
                "pip install datasets to use them."
            )

        # a class, so `isinstance(x, Dataset)` in the loader's code stays valid (and False)
        return type(attr, (), {"__init__": _missing, "__module__": name}) if attr[:1].isupper() else _missing

    mod.__getattr__ = __getattr__
    return mod


@contextlib.contextmanager
def _without_datasets():
    names = ("datasets", "datasets.distributed")
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules["datasets"] = _datasets_placeholder("datasets")
    sys.modules["datasets.distributed"] = _datasets_placeholder("datasets.distributed")
    try:
        yield
    finally:  # only TorchTitan's module keeps the placeholders; `import datasets` still fails
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _datasets_importable() -> bool:
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def _patch_hf_datasets_absent() -> bool:
    if _datasets_importable() or _HF_TEXT in sys.modules:
        return False
    _while_importing(_HF_TEXT, _without_datasets)
    return True


def _restart_attempt() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"


def _per_attempt_init(original: Callable) -> Callable:
    """TorchTitan's `init_distributed`, with `init_process_group` given a per-attempt PrefixStore."""
    import functools
    from datetime import timedelta

    @functools.wraps(original)
    def init_distributed(comm_config, *args, **kwargs):
        attempt = _restart_attempt()
        if attempt == "0" or dist.is_initialized() or "MASTER_ADDR" not in os.environ:
            return original(comm_config, *args, **kwargs)
        from torch.distributed import PrefixStore, TCPStore

        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        timeout = timedelta(seconds=comm_config.init_timeout_seconds)
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            base = TCPStore(addr, port, world, is_master=False, timeout=timeout)
        else:
            base = TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout, multi_tenant=True)
        store = PrefixStore(f"titan_rw/attempt_{attempt}/", base)
        plain = torch.distributed.init_process_group
        torch.distributed.init_process_group = functools.partial(plain, store=store, rank=rank, world_size=world)
        try:
            return original(comm_config, *args, **kwargs)
        finally:
            torch.distributed.init_process_group = plain

    return init_distributed


def _wrap_init_distributed(mod: types.ModuleType) -> None:
    mod.init_distributed = _per_attempt_init(mod.init_distributed)


def _patch_restart_rendezvous() -> bool:
    if _restart_attempt() == "0" or not dist.is_available():
        return False
    _after_import("torchtitan.distributed.utils", _wrap_init_distributed)
    return True


_PATCHES: tuple[tuple[str, Callable[[], bool]], ...] = (
    ("triton_stub", _patch_triton_stub),
    ("cpu_device", _patch_cpu_device),
    ("set_timeout", _patch_set_timeout),
    ("sdpa_attention", _patch_sdpa_attention),
    ("partial_dtensor", _patch_partial_dtensor),
    ("force_sum_reduce", _patch_force_sum_reduce),
    ("mesh_dims_standin", _patch_mesh_dims_standin),
    ("block_mask_kwargs", _patch_block_mask_kwargs),
    ("trunc_normal_2_13", _patch_trunc_normal_2_13),
    ("hf_datasets_absent", _patch_hf_datasets_absent),
    ("restart_rendezvous", _patch_restart_rendezvous),
)


class _DropMessages(logging.Filter):
    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p in msg for p in self.parts)


def _quiet_torchao_import() -> None:
    """See the module docstring ("Not a patch"): torchao's CUDA-library and enum-registration
    warnings at import, dropped where there is no CUDA."""
    if has_cuda():
        return
    logging.getLogger("torchao").addFilter(_DropMessages("Failed to load "))
    logging.getLogger("torch.utils._pytree").addFilter(
        _DropMessages("is an Enum subclass and is now natively supported by torch.compile"))


def apply() -> tuple[str, ...]:
    """Install every needed patch, once. Safe to call again (no-op)."""
    global _done
    if _done:
        return applied_patches()
    _done = True
    _quiet_torchao_import()
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
