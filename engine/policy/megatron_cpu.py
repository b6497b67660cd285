"""Run megatron-core on CPU with gloo: the few CUDA calls it makes unconditionally, redirected.

megatron-core assumes a GPU: it allocates with ``device=torch.cuda.current_device()``, keeps its
tensor-parallel RNG streams as CUDA generator states and builds the causal mask with ``device="cuda"``.
On a CPU-only torch each of those raises. ``apply()`` redirects them to the CPU, and only when CUDA is
absent, inside the Megatron worker's own process (a Ray actor). Every patched call would raise on this
machine otherwise, so nothing that works is changed. The rest of the project never imports this module.

Patched, and why:
- ``torch.cuda.current_device`` -> ``"cpu"``: used as the ``device=`` of new tensors in rotary embeddings,
  tensor-parallel layers and mappings, attention, the GPT model and the distributed optimizer's buffers.
- ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed`` and megatron's
  ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU generator: the tensor-parallel RNG tracker
  forks named generator states around weight init and dropout.
- ``transformer.utils.get_default_causal_mask`` (and its import in ``fusions.fused_softmax``): built on "cuda".
- ``torch.cuda.synchronize`` / ``empty_cache`` / ``is_current_stream_capturing`` -> no-ops / ``False``:
  called by the distributed optimizer, the schedules and the CUDA-graph checks.
- ``torch.cuda.current_stream`` -> a stream whose waits are no-ops: megatron-core >= 0.19 waits on CUDA-graph
  events of the current stream before reducing gradients (there are none on CPU).
- ``torch.Tensor.cuda`` -> the tensor itself: optimizer state and checkpoint loading move tensors "back" to the GPU.
- ``torch.Tensor.type()`` (no argument) -> the CUDA type name: the optimizers sort parameters into fp32/fp16
  groups by comparing it with ``"torch.cuda.FloatTensor"`` and friends, and reject anything else.
- ``DistributedOptimizer._set_main_param_and_optimizer_states`` keeps torch Adam's per-parameter ``step`` aside
  while it copies a loaded checkpoint's tensors: without apex or Transformer Engine (always the case on CPU) the
  optimizer restores ``step`` on its own and the fully reshardable loader hands over no ``step`` tensor, so the
  unpatched copy fails with ``KeyError: 'step'``.
- ``device="cuda"`` literals in factory calls (``torch.tensor``, ``zeros``, ``empty``, ...) of the modules in
  ``CUDA_LITERAL_MODULES`` (optimizer flags and grad-norm buffers, grad-buffer warm-up, the schedules' token
  counters, checkpoint exchange buffers, the local multi-tensor L2 norm): those modules see a ``torch`` whose
  factories put them on the CPU.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import torch

_APPLIED = False
CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.utils",
)
FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "empty_like", "ones_like")


def _on_cpu(factory: Callable) -> Callable:
    def create(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return create


class _TorchOnCpu:
    """``torch`` as one megatron module sees it: the same, except that factories never allocate on "cuda"."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


for _name in FACTORIES:
    setattr(_TorchOnCpu, _name, staticmethod(_on_cpu(getattr(torch, _name))))


@functools.lru_cache
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


class _HostStream:
    """The 'current stream' of a CPU process: work is already ordered, so waiting is a no-op."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass


_tensor_type = torch.Tensor.type


def _type_named_as_cuda(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    if dtype is None:
        name = _tensor_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    return _tensor_type(self, dtype, non_blocking, **kwargs)


def _keep_adam_step_aside(original: Callable) -> Callable:
    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = None if "step" in tensors else state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return set_states


def apply() -> bool:
    """Patch once per process when CUDA is absent; returns whether patches are in place."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.cuda.current_stream = lambda device=None: _HostStream()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _type_named_as_cuda
    for name in CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = _TorchOnCpu()
    DistributedOptimizer._set_main_param_and_optimizer_states = _keep_adam_step_aside(
        DistributedOptimizer._set_main_param_and_optimizer_states
    )
    tp_random._get_cuda_rng_state = _cpu_rng_state
    tp_random._set_cuda_rng_state = _set_cpu_rng_state
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    _APPLIED = True
    return True
