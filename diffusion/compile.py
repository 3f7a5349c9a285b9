"""`compile`: torch.compile on the native denoisers, and what it cost.

none      eager
regional  each repeated block compiled once (diffusers' `compile_repeated_blocks` convention: a model
          class lists the class names of its repeated blocks in `_repeated_blocks`). Blocks of one
          class share their compiled code (parameters are graph inputs), so compile time does not
          grow with depth, and the model's own forward (and any hook driving it, e.g. DeepCache's
          shallow steps) stays eager
full      the whole denoiser compiled (`nn.Module.compile`, in place: hooks still find its modules)

Hooks that act inside a block (T-GATE's attention wrappers) are traced into the compiled code: their
per-step decision (compute / cache / reuse, one branch or two) is a guard, so each distinct decision
compiles once and is then reused. The number of graphs is bounded by the decisions, never by the
number of steps; `CompileStats` counts them (and the recompiles) for metrics.json.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from diffusion.errors import UserError

COMPILE_MODES = ("none", "regional", "full")
# backends of torch.compile worth naming here: inductor (the speed), aot_eager (same graphs, no codegen:
# seconds to compile, for parity tests), eager (dynamo tracing only)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def check_compile(mode: str, backend: str = "inductor") -> None:
    if mode not in COMPILE_MODES:
        raise UserError(f"compile={mode!r}: allowed values are {', '.join(COMPILE_MODES)}")
    if backend not in COMPILE_BACKENDS:
        raise UserError(f"compile_backend={backend!r}: allowed values are {', '.join(COMPILE_BACKENDS)}")


def repeated_block_names(model: nn.Module) -> set[str]:
    """Class names listed in `_repeated_blocks` by any module of `model` (a wrapper such as the
    class-conditional LDM need not repeat its U-Net's list)."""
    return {name for module in model.modules() for name in getattr(type(module), "_repeated_blocks", ())}


def compile_denoiser(model: nn.Module, mode: str, backend: str = "inductor") -> int:
    """Compile `model` in place; returns the number of modules compiled (0 for mode=none)."""
    check_compile(mode, backend)
    if mode == "none":
        return 0
    if mode == "full":
        model.compile(backend=backend)
        return 1
    names = repeated_block_names(model)
    if not names:
        raise UserError(f"compile=regional: {type(model).__name__} lists no repeated blocks (_repeated_blocks); "
                         "use compile=full or compile=none")
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", ()))


def _graphs_and_recompiles() -> tuple[int, int]:
    from torch._dynamo.utils import counters, guard_failures

    return counters["stats"]["unique_graphs"], sum(len(v) for v in guard_failures.values())


@dataclass
class CompileStats:
    """What torch.compile did inside `with` blocks (summed over every use): seconds spent compiling
    (dynamo tracing and the backend), graphs compiled, and recompiles (a guard failed: a new shape or
    hook decision)."""

    seconds: float = 0.0
    graphs: int = 0
    recompiles: int = 0

    def __enter__(self) -> CompileStats:
        self._start = (_compile_seconds(), *_graphs_and_recompiles())
        return self

    def __exit__(self, *exc) -> None:
        seconds, graphs, recompiles = self._start
        now_graphs, now_recompiles = _graphs_and_recompiles()
        self.seconds += _compile_seconds() - seconds
        self.graphs += now_graphs - graphs
        self.recompiles += now_recompiles - recompiles

    def as_metrics(self) -> dict:
        return {"compile_seconds": self.seconds, "compiled_graphs": self.graphs, "recompiles": self.recompiles}
