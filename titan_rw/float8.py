"""float8 training of the blocks' Linear layers: the `[float8]` section, applied through TorchTitan
0.3.0's `Float8LinearConverter` (torchao's `Float8Linear`) to the model config the trainer builds.

The keys are TorchTitan's (`Float8LinearConverter.Config`): `enable`, `recipe_name` ("rowwise" or
"rowwise_with_gw_hp"), `filter_fqns` (modules kept in high precision: a module is kept when one of
these strings is a substring of its name) and `emulate` (float8 matmuls emulated in high precision,
eager only: for testing on CPU or a GPU below SM89; TorchTitan 0.3.0 then uses torchao's default
tensorwise config whatever `recipe_name` says).

What stays in high precision, always:
- the output projection `lm_head`: the per-sample loss (titan_rw.loss) reads `lm_head.weight` in
  its chunked matmul and again in its recomputing backward, so a float8 `lm_head` would not be used
  as one. `OUTPUT_PROJECTION` is added to `filter_fqns` by `converter_config` whatever the user
  wrote, and the trainer refuses a model whose `lm_head` is a `Float8Linear`
  (`check_model`, for a `ReweightTrainer.Config` built in Python);
- a Linear with a dimension not divisible by 16 (float8 tensor cores need it): TorchTitan's filter
  (`torchtitan.components.quantization.utils.module_filter_fn`) skips it.

torchao is an optional dependency: `pip install 'titan_rw[float8]'`. Checks before any compute
(`Float8Config.validate`, called by titan_rw.config with the file's name), each one line:
torchao missing, `emulate` with `compile.enable` (TorchTitan: emulation is eager-only), and float8
without `emulate` on a machine without an NVIDIA GPU of compute capability 8.9+ (or AMD MI300+).

The weights of a `Float8Linear` are plain high-precision tensors (no float8 all-gather is
configured): a float8 run's checkpoints load into a run without float8 and export to Hugging Face
like any other (tests/test_float8.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Literal

import torch

OUTPUT_PROJECTION = "lm_head"
EXTRA = "titan_rw[float8]"
RECIPES = ("rowwise", "rowwise_with_gw_hp")


def torchao_available() -> bool:
    return find_spec("torchao") is not None


def float8_hardware() -> bool:
    """TorchTitan's own test: an NVIDIA GPU of compute capability >= 8.9 or AMD gfx942+."""
    from torchtitan.tools.utils import has_cuda_capability, has_rocm_capability

    return has_cuda_capability(8, 9) or has_rocm_capability(9, 4)


def _device_name() -> str:
    if not torch.cuda.is_available():
        return "no GPU"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (SM{major}{minor})"


@dataclass(kw_only=True)
class Float8Config:
    """The `[float8]` section (TorchTitan's `Float8LinearConverter.Config` keys); off by default."""

    enable: bool = False
    """Train the blocks' Linear layers in float8 (torchao's Float8Linear)."""
    recipe_name: Literal["rowwise", "rowwise_with_gw_hp"] = "rowwise"
    """torchao's recipe: "rowwise", or "rowwise_with_gw_hp" (the weight gradient in high precision)."""
    filter_fqns: list[str] = field(default_factory=list)
    """Modules kept in high precision (substring of the module name, e.g. "layers.0."); the output
    projection "lm_head" always is, and so is any Linear with a dimension not divisible by 16."""
    emulate: bool = False
    """Emulate the float8 matmuls (eager only, no compile): for tests on CPU or a GPU below SM89."""

    def validate(self, *, compile_model: bool = False) -> None:
        """One-line ValueError for what cannot run (the caller adds the file's name)."""
        if not self.enable:
            return
        if self.recipe_name not in RECIPES:
            raise ValueError(f"float8.recipe_name = {self.recipe_name!r} is not one of {', '.join(RECIPES)}")
        if not torchao_available():
            raise ValueError(f"float8.enable = true needs torchao, which is not installed: "
                             f"pip install '{EXTRA}' (or set float8.enable = false)")
        if self.emulate and compile_model:
            raise ValueError("float8.emulate = true runs in eager mode only (TorchTitan refuses it with compile): "
                             "set compile.enable = false, or float8.emulate = false on a GPU of SM89 or later")
        if not self.emulate and not float8_hardware():
            raise ValueError(f"float8.enable = true needs an NVIDIA GPU of compute capability 8.9 or later (H100, "
                             f"L40S, ...) or an AMD MI300, and this machine has {_device_name()}: set "
                             f"float8.emulate = true (eager, for tests) or float8.enable = false")

    def converter_config(self, *, compile_model: bool = False):
        """TorchTitan's `Float8LinearConverter.Config` with `OUTPUT_PROJECTION` in `filter_fqns`."""
        from torchtitan.components.quantization.float8 import Float8LinearConverter

        fqns = list(self.filter_fqns)
        if OUTPUT_PROJECTION not in fqns:
            fqns.append(OUTPUT_PROJECTION)
        return Float8LinearConverter.Config(recipe_name=self.recipe_name, filter_fqns=fqns, emulate=self.emulate,
                                            model_compile_enabled=compile_model)

    def convert(self, model_config, *, compile_model: bool = False):
        """The model config with the chosen Linear configs swapped for Float8Linear's (unchanged when
        `enable` is false): TorchTitan's converter, as its model registry applies it."""
        if not self.enable:
            return model_config
        self.validate(compile_model=compile_model)
        return self.converter_config(compile_model=compile_model).build().convert(model_config)


def float8_modules(model: torch.nn.Module) -> list[str]:
    """Names of the model's torchao `Float8Linear` modules (wrappers' prefixes removed)."""
    if not torchao_available():
        return []
    from torchao.float8.float8_linear import Float8Linear

    return [name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            for name, m in model.named_modules() if isinstance(m, Float8Linear)]


def high_precision_linears(model: torch.nn.Module) -> list[str]:
    """Names of the model's Linear modules that are not float8."""
    f8 = set(float8_modules(model))
    return [name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            if name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "") not in f8]


def check_model(model: torch.nn.Module) -> None:
    """The per-sample loss reads `lm_head.weight` itself: a float8 `lm_head` is refused in one line.
    A float8 model logs which Linear layers are float8 and which stay in high precision."""
    f8 = float8_modules(model)
    if OUTPUT_PROJECTION in f8:
        raise ValueError(
            f"titan_rw: the output projection {OUTPUT_PROJECTION!r} was converted to float8, but the per-sample "
            f"loss applies it itself in high precision (titan_rw.loss): keep {OUTPUT_PROJECTION!r} in the "
            f"converter's filter_fqns (titan_rw.float8.Float8Config does)")
    if f8:
        from torchtitan.tools.logging import logger

        logger.info(f"titan_rw float8: {len(f8)} Linear layers in float8 (torchao Float8Linear), in high "
                    f"precision: {', '.join(high_precision_linears(model))}")
