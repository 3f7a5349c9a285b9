"""`compile`: torch.compile on the denoisers, and what it did (real counts, read from dynamo).

none      eager
regional  each repeated block compiled (diffusers' `compile_repeated_blocks` convention: a model class
          lists the class names of its repeated blocks in `_repeated_blocks`; REPEATED_BLOCKS below names
          them for diffusers transformers that list none). One `torch.compile` per block class per model
          (`isolate_recompiles`): the blocks of a model share its graphs (parameters are graph inputs), and
          each model has its own cache and its own `recompile_limit`, so stitched models of one class (DiT-S
          and DiT-L share `DiTBlock.forward`) never fill each other's cache. The batch dimension is marked
          dynamic at every block call, so halving the CFG batch at T-GATE's gate compiles nothing new. The
          model's own forward and every hook on the block (DeepCache's feature capture) stay eager
full      the whole denoiser compiled (its forward, in place: hooks still find its modules), its own region and
          the batch dynamic as for a block

Hooks that decide per step inside a block (T-GATE's attention wrappers) keep their decision out of the
compiled code (`torch.compiler.disable`): a traced decision would be a guard, and the graphs would then
depend on which decisions a run reaches (on `sampler.steps`). Such a hook may offer
`compile_inner(compile_method)`: the work it wraps (the attention module's own forward) is then compiled
as a region of its own. The graph set is fixed per model and technique.

`compile_mode` (`default` | `reduce-overhead` | `max-autotune`) is torch.compile's `mode` (inductor only;
the other backends ignore it). `reduce-overhead` (CUDA graphs) needs CUDA: on a CPU it is downgraded to
`default` with a one-line note. Tensors a technique keeps across steps go through `kept` (a clone while
CUDA graphs are on: a later replay would overwrite a graph's output in place).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import nn

from diffusion.errors import UserError

log = logging.getLogger(__name__)

COMPILE_MODES = ("none", "regional", "full")
# backends of torch.compile worth naming here: inductor (the speed), aot_eager (same graphs, no codegen:
# seconds to compile, for parity tests), eager (dynamo tracing only)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # the `compile_mode` key

# diffusers transformers whose class lists no `_repeated_blocks` (diffusers 0.42): their blocks by class name.
# Flux lists its own; it is here too so an older diffusers works the same.
REPEATED_BLOCKS = {
    "SD3Transformer2DModel": ("JointTransformerBlock",),
    "PixArtTransformer2DModel": ("BasicTransformerBlock",),
    "DiTTransformer2DModel": ("BasicTransformerBlock",),
    "Transformer2DModel": ("BasicTransformerBlock",),
    "FluxTransformer2DModel": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
}

_cuda_graphs = False  # set once a model is compiled with reduce-overhead: `kept` clones then


def check_compile(mode: str, backend: str = "inductor", compile_mode: str = "default") -> None:
    if mode not in COMPILE_MODES:
        raise UserError(f"compile={mode!r}: allowed values are {', '.join(COMPILE_MODES)}")
    if backend not in COMPILE_BACKENDS:
        raise UserError(f"compile_backend={backend!r}: allowed values are {', '.join(COMPILE_BACKENDS)}")
    if compile_mode not in TORCH_COMPILE_MODES:
        raise UserError(f"compile_mode={compile_mode!r}: allowed values are {', '.join(TORCH_COMPILE_MODES)}")


def resolve_compile_mode(compile_mode: str, device: torch.device) -> str:
    """`reduce-overhead` records CUDA graphs: on another device it is `default`, said in one line."""
    if compile_mode == "reduce-overhead" and torch.device(device).type != "cuda":
        log.warning("compile_mode=reduce-overhead needs CUDA (CUDA graphs); on %s it runs as compile_mode=default",
                    torch.device(device).type)
        return "default"
    return compile_mode


def kept(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor a technique keeps for later steps (T-GATE's cached attention, DeepCache's feature): cloned
    while CUDA graphs are on, since a graph's replay writes its outputs into the same memory."""
    return tensor.clone() if _cuda_graphs else tensor


def repeated_block_names(model: nn.Module) -> set[str]:
    """Class names listed in `_repeated_blocks` by any module of `model` (a wrapper such as the
    class-conditional LDM need not repeat its U-Net's list), or named for it in REPEATED_BLOCKS."""
    names = set()
    for module in model.modules():
        names.update(getattr(type(module), "_repeated_blocks", None) or ())
        names.update(REPEATED_BLOCKS.get(type(module).__name__, ()))
    return names


def _mark_batch_dynamic(args, kwargs) -> None:
    """Dim 0 of every tensor argument with the first one's batch: a hint (`maybe_mark_dynamic`), so the
    graph takes the 2B rows of a CFG step and the B rows after T-GATE's gate alike (sizes 0 and 1 stay
    specialised: a batch of one after the gate compiles once more)."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim()]
    if tensors and tensors[0].shape[0] > 1:
        rows = tensors[0].shape[0]
        for t in tensors:
            if t.shape[0] == rows:
                torch._dynamo.maybe_mark_dynamic(t, 0)


def _mode_option(backend: str, compile_mode: str) -> dict:
    """torch.compile's `mode` keyword: inductor's (the other backends warn and ignore it)."""
    return {"mode": compile_mode} if backend == "inductor" and compile_mode != "default" else {}


class CompiledForward:
    """A module's forward, compiled: set as the module's `forward`, so its `__call__` (and hooks) stay eager."""

    def __init__(self, compiled, module: nn.Module):
        self.compiled, self.module = compiled, module

    def __call__(self, *args, **kwargs):
        _mark_batch_dynamic(args, kwargs)
        return self.compiled(self.module, *args, **kwargs)


@dataclass
class ModelCompiler:
    """One torch.compile per function per model: the region (cache, limit) that model's modules share."""

    backend: str = "inductor"
    compile_mode: str = "default"
    dynamic: bool | None = None  # torch.compile's: True for a whole model (see compile_denoiser)
    _compiled: dict = field(default_factory=dict)

    def compile_method(self, bound):
        """`bound` (a module's bound forward) compiled, or `bound` itself when it is not a plain method."""
        func = getattr(bound, "__func__", None)
        if func is None or not isinstance(getattr(bound, "__self__", None), nn.Module):
            return bound
        if func not in self._compiled:
            self._compiled[func] = torch.compile(func, backend=self.backend, isolate_recompiles=True,
                                                 dynamic=self.dynamic, **_mode_option(self.backend, self.compile_mode))
        return CompiledForward(self._compiled[func], bound.__self__)

    def compile_module(self, module: nn.Module) -> None:
        """In place: the module's class forward compiled. A module whose `forward` was already replaced
        (another library's hook) is compiled the plain way, `module.compile` (the shared region); one
        compiled already is left as it is."""
        if isinstance(vars(module).get("forward"), CompiledForward):
            return
        if "forward" in vars(module):
            module.compile(backend=self.backend, **_mode_option(self.backend, self.compile_mode))
            return
        module.forward = self.compile_method(MethodType(type(module).forward, module))


def _compile_hook_inners(model: nn.Module, compiler: ModelCompiler) -> None:
    """Hooks that keep their per-step decision eager compile the work they wrap (`compile_inner`)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (getattr(registry, "hooks", None) or {}).values():
            if hasattr(hook, "compile_inner"):
                hook.compile_inner(compiler.compile_method)


def compile_denoiser(model: nn.Module, mode: str, backend: str = "inductor", compile_mode: str = "default") -> int:
    """Compile `model` in place; returns the number of modules compiled (0 for mode=none)."""
    global _cuda_graphs
    check_compile(mode, backend, compile_mode)
    if mode == "none":
        return 0
    _cuda_graphs = _cuda_graphs or (compile_mode == "reduce-overhead" and backend == "inductor")
    compiler = ModelCompiler(backend, compile_mode)
    if mode == "full":
        # a hook's eager decision splits the model's frame at each block; the frames after a split get
        # unmarked tensors, so sizes are dynamic from the start (dynamic=True) rather than marked
        compiler.dynamic = True
        compiler.compile_module(model)  # its own region
        _compile_hook_inners(model, compiler)
        return 1
    names = repeated_block_names(model)
    if not names:
        raise UserError(f"compile=regional: {type(model).__name__} lists no repeated blocks (_repeated_blocks); "
                         "use compile=full or compile=none")
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        compiler.compile_module(block)
    for block in blocks:
        _compile_hook_inners(block, compiler)
    return len(blocks)


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", ()))


def _compile_events() -> list:
    """dynamo's record of each frame compile (CompilationMetrics), oldest first; its deque is made long
    enough that a run's events stay in it."""
    from torch._dynamo import utils

    if (utils._compilation_metrics.maxlen or 0) < 4096:
        utils.set_compilation_metrics_limit(4096)
    return utils.get_compilation_metrics()


def _limit_hit(event) -> bool:
    return bool(event.fail_reason) and "recompile limit exceeded" in event.fail_reason


@dataclass
class CompileStats:
    """What torch.compile did inside `with` blocks (summed over every use), from dynamo's own records:
    seconds spent compiling (dynamo tracing and the backend), graphs compiled, recompiles (a frame compiled
    again because a guard failed: a new shape or a traced decision; the reasons go to the log at debug
    level) and whether a frame hit dynamo's `recompile_limit` (it then runs eager: one warning line)."""

    seconds: float = 0.0
    graphs: int = 0
    recompiles: int = 0
    limit_hits: int = 0
    reasons: list = field(default_factory=list)

    def __enter__(self) -> CompileStats:
        from torch._dynamo.utils import counters

        events = _compile_events()
        self._start = (_compile_seconds(), counters["stats"]["unique_graphs"], events[-1] if events else None)
        return self

    def __exit__(self, *exc) -> None:
        from torch._dynamo.utils import counters

        seconds, graphs, last = self._start
        events = _compile_events()
        new = events[next((i + 1 for i, e in enumerate(events) if e is last), 0):] if last is not None else events
        self.seconds += _compile_seconds() - seconds
        self.graphs += counters["stats"]["unique_graphs"] - graphs
        hits = [event for event in new if _limit_hit(event)]
        for event in new:
            if event.recompile_reason and not _limit_hit(event):
                self.recompiles += 1
                self.reasons.append(f"{event.compile_id} {event.co_name}: {event.recompile_reason}")
                log.debug("recompiled %s (%s): %s", event.co_name, event.compile_id, event.recompile_reason)
        if hits:  # one line, however many frames hit it
            self.limit_hits += len(hits)
            log.warning("torch.compile hit dynamo's recompile_limit (%d) in %d frame(s), first %s: those run eager "
                        "from here on; its last reason: %s", torch._dynamo.config.recompile_limit, len(hits),
                        hits[0].co_name, (hits[0].recompile_reason or "?").splitlines()[0])

    def as_metrics(self) -> dict:
        return {"compile_seconds": self.seconds, "compiled_graphs": self.graphs, "recompiles": self.recompiles,
                "recompile_limit_hit": self.limit_hits > 0}
