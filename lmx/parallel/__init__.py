"""Device meshes, logical-axis sharding rules and sharded placement (pjit semantics via ``jax.jit``).

Parameters carry logical axis names in their ``logical_axes`` metadata (e.g. ``("layers",
"embed", "qkv")``); :data:`DEFAULT_RULES` maps those names to mesh axes ``data``/``fsdp``/
``tensor`` (MaxText style). A dimension whose size does not divide by its mesh axes is left
replicated, so any model runs on any mesh (GSPMD keeps results identical; only speed changes).

Multi-host (one process per host, JAX's own runtime): call :func:`initialize_distributed` first
thing in the program. It joins the processes through ``jax.distributed.initialize`` when a
coordinator is named or a cluster launcher is detected (SLURM, Open MPI, multi-host cloud TPU),
and is a no-op on a single process. :func:`make_mesh` / :func:`mesh_from_spec` then span every
process's devices, and :func:`shard_batch` assembles the global batch from each process's own
rows (``jax.make_array_from_process_local_data``): a host loads only its part of the data.

Activations carry logical names too (``"activation_batch"``, ``"activation_heads"``, ...): the
model calls :func:`constrain` on them, which pins their sharding inside a traced step while a
:func:`logical_sharding` context is active and is the identity otherwise (MaxText's
``nn.with_logical_constraint`` in spirit). Without the pins GSPMD infers activation layouts from
the parameters alone, and with FSDP-sharded weights it may choose to shard an activation's
feature dimension instead of its batch, all-gathering activations rather than weights.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "qkv": "tensor",
    "mlp": "tensor",
    "layers": None,
    # arrays with no model-specific names (merge masks, task vectors): one dimension split FSDP-style
    "shard": "fsdp",
    # activations: batch over every data-parallel axis, features whole under FSDP (the weights are
    # gathered, not the activations), head/MLP/vocab features split over `tensor`
    "activation_batch": BATCH_AXES,
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
}


# Variables that a multi-process launch sets and ``jax.distributed.initialize()`` reads on its own
# (its cluster auto-detection); the value is the variable holding the number of processes.
CLUSTER_PROCESS_COUNT_VARS = {
    "SLURM_JOB_ID": "SLURM_NTASKS",
    "OMPI_MCA_orte_hnp_uri": "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES": "TPU_WORKER_HOSTNAMES",
}
COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def cluster_detected(environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher that started this process as one of several (``"SLURM_JOB_ID"``, ...), or None.

    A one-task SLURM job or a single TPU host is not a multi-process launch.
    """
    env = os.environ if environ is None else environ
    for marker, count_var in CLUSTER_PROCESS_COUNT_VARS.items():
        if marker not in env:
            continue
        count = env.get(count_var, "")
        n = len(count.split(",")) if count_var == "TPU_WORKER_HOSTNAMES" else (
            int(count) if count.isdigit() else 0)
        if n > 1:
            return marker
    return None


def initialize_distributed(**kwargs: Any) -> bool:
    """Join this process to a multi-process JAX run; returns whether one is running.

    Calls ``jax.distributed.initialize(**kwargs)`` when ``kwargs`` are given (e.g.
    ``coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0``), when a coordinator
    variable (:data:`COORDINATOR_VARS`) is set, or when :func:`cluster_detected` finds a
    multi-process launcher; JAX then reads the rest from the launcher's environment. On one
    process it does nothing, so programs call it unconditionally, before anything else touches
    JAX devices. Calling it again is a no-op. CPU processes exchange collectives over gloo.
    """
    if jax.distributed.is_initialized():
        return True
    if not (kwargs or any(os.environ.get(v) for v in COORDINATOR_VARS) or cluster_detected()):
        return False
    # CPU backends need a cross-process collectives library; GPU/TPU backends ignore this flag
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axes (GSPMD). ``data=None`` takes all remaining devices.

    Devices are laid out by ``jax.make_mesh`` (topology-aware, and across every process of a
    multi-host run); ``devices`` restricts the mesh to the first ``data*fsdp*tensor`` of those given.
    """
    devices = list(devices if devices is not None else jax.devices())
    for name, v in (("fsdp", fsdp), ("tensor", tensor)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if data is None:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices do not divide by fsdp*tensor = {fsdp * tensor}")
        data = len(devices) // (fsdp * tensor)
    n = data * fsdp * tensor
    if n > len(devices) or n < 1:
        raise ValueError(f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {n} needs {n} devices, "
                         f"have {len(devices)}")
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:n])


def mesh_from_spec(spec: str | Mapping[str, int] | None = None,
                   devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from ``"data=2,fsdp=4,tensor=1"`` (or a dict of the same); a missing ``data`` takes
    the remaining devices, a missing ``fsdp``/``tensor`` is 1; ``None`` or ``""``: all devices on ``data``.

    Raises:
      ValueError: an unknown axis, a repeated axis, a size that is not a positive int, or sizes
        whose product does not fit the devices.
    """
    if spec is None or spec == "":
        sizes: dict[str, int] = {}
    elif isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"mesh spec {spec!r}: each part must be <axis>=<int> with axis in "
                                 f"{MESH_AXES}, got {part!r}")
            if name in sizes:
                raise ValueError(f"mesh spec {spec!r} names axis {name!r} twice")
            sizes[name] = int(value)
    elif isinstance(spec, Mapping):
        sizes = dict(spec)
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh spec {spec!r}: unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    else:
        raise TypeError(f"mesh spec must be a str, a mapping or None, got {type(spec).__name__}")
    for name, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"mesh spec {spec!r}: {name} must be a positive int, got {v!r}")
    return make_mesh(sizes.get("data"), sizes.get("fsdp", 1), sizes.get("tensor", 1), devices=devices)


def describe_mesh(mesh: Mesh) -> dict[str, Any]:
    """What a result file records about where a run ran: axis sizes, devices, processes."""
    return {"axes": {name: int(size) for name, size in mesh.shape.items()}, "devices": int(mesh.size),
            "process_count": jax.process_count(), "device_kind": mesh.devices.flat[0].device_kind}


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _axis_size(mesh: Mesh, axes: tuple[str, ...] | str | None) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> P:
    """PartitionSpec for an array with logical axis ``names``; indivisible dims stay replicated,
    and a mesh axis is used at most once per array."""
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match array rank {len(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = rules.get(name) if name is not None else None
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        flat = tuple(a for a in flat if a in mesh.shape and a not in used)
        if not flat or dim % _axis_size(mesh, flat):
            spec.append(None)
            continue
        used.update(flat)
        spec.append(flat[0] if len(flat) == 1 else flat)
    return P(*spec)


_ACTIVE_SHARDING: contextvars.ContextVar[tuple[Mesh, Mapping[str, Any]] | None] = contextvars.ContextVar(
    "lmx_logical_sharding", default=None)


@contextlib.contextmanager
def logical_sharding(mesh: Mesh | None, rules: Mapping[str, Any] = DEFAULT_RULES):
    """While active (during tracing), :func:`constrain` pins activations on ``mesh`` by ``rules``.

    ``mesh=None`` or a one-device mesh deactivates the pins (nothing to place). Wrap the body of a
    step function in it: the pins become part of the traced program, so the compiled step keeps
    them whatever context it is later called from.
    """
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    token = _ACTIVE_SHARDING.set(None if mesh is None or mesh.size == 1 else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE_SHARDING.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` with its sharding pinned to the logical axis ``names`` (one per dimension) under the
    active :func:`logical_sharding`; ``x`` unchanged when none is active. A dimension whose size
    does not divide its mesh axes stays replicated (as for parameters)."""
    active = _ACTIVE_SHARDING.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf of an NNX state (or a pytree of arrays), from ``logical_axes``."""
    def one(x):
        if _is_var(x):
            names = x.get_metadata().get("logical_axes")
            return x.replace(NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> nnx.Module:
    """Place a model's state on ``mesh`` per its logical axes (in place; returns the model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def _batch_axes(rules: Mapping[str, Any]) -> tuple[str, ...]:
    axes = rules.get("batch")
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0,
                   rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
    """Shard dimension ``batch_axis`` over the mesh axes of the logical ``"batch"`` rule
    (``data`` x ``fsdp`` by default)."""
    spec: list[Any] = [None] * ndim
    spec[batch_axis] = _batch_axes(rules)
    return NamedSharding(mesh, P(*spec))


def _local_batch_shards(sharding: NamedSharding, ndim: int, batch_axis: int, n: int) -> int:
    """How many distinct batch shards live on this process's devices."""
    shape = [1] * ndim
    shape[batch_axis] = n
    index = sharding.addressable_devices_indices_map(tuple(shape))
    return len({idx[batch_axis].indices(n)[0] for idx in index.values()})


def shard_batch(batch: Any, mesh: Mesh, batch_axis: int = 0,
                rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """Global arrays from this process's rows of ``batch``, sharded on ``batch_axis`` per the
    ``"batch"`` rule (``jax.make_array_from_process_local_data``).

    On one process ``batch`` is the whole batch. In a multi-process run each process passes only
    its own rows (its contiguous block, in process order) and the global batch is their
    concatenation: no host holds or transfers the others' data, and no cross-host check runs.

    Raises:
      ValueError: an array whose ``batch_axis`` size does not split evenly over this process's
        batch shards (naming its shape and the mesh axes), before anything is placed.
    """
    axes = _batch_axes(rules)
    n = _axis_size(mesh, axes)

    def put(x):
        x = np.asarray(x)
        if x.ndim <= batch_axis:
            raise ValueError(f"batch array of shape {x.shape} has no axis {batch_axis} to shard")
        sharding = batch_sharding(mesh, x.ndim, batch_axis, rules)
        local = _local_batch_shards(sharding, x.ndim, batch_axis, n)
        if x.shape[batch_axis] % local:
            raise ValueError(f"batch array of shape {x.shape} cannot be split {local} ways along axis "
                             f"{batch_axis} (mesh axes {axes} of size {n}, {local} on this process)")
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# XLA:CPU hands f32 matmuls to YNNPACK by default; oneDNN's kernels ran the SmolLM2-135M train
# step 12-14 % faster on the 2-core AMD EPYC CI machine (5.05 vs 5.84 s at 4x256, 2026-11-26),
# with the same f32 results (max relative error vs float64 1.1e-6 both ways).
ONEDNN_MATMUL_OPTIONS = {"xla_cpu_use_onednn": True,
                         "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


# jaxlib versions whose oneDNN fusions were checked against the crash shapes that
# :func:`onednn_fusions_supported` screens out; elsewhere they stay off unless asked for.
ONEDNN_VERIFIED_JAXLIB = ("0.10.2",)


@functools.cache
def cpu_compiler_options() -> dict[str, Any]:
    """XLA compiler options for heavy CPU programs (used through :class:`TunedJit`).

    :data:`ONEDNN_MATMUL_OPTIONS` (matmuls through oneDNN) on the CPU backend of a jaxlib in
    :data:`ONEDNN_VERIFIED_JAXLIB` that accepts them (probed once by compiling a small matmul);
    otherwise, and on GPU/TPU, ``{}`` (XLA's defaults). The environment variable
    ``LMX_ONEDNN_MATMULS`` overrides the version check: ``1`` turns them on for any jaxlib that
    accepts them, ``0`` off.
    """
    choice = os.environ.get("LMX_ONEDNN_MATMULS", "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"LMX_ONEDNN_MATMULS must be 'auto', '0' or '1', got {choice!r}")
    if jax.default_backend() != "cpu" or choice == "0":
        return {}
    if choice == "auto" and jax.lib.__version__ not in ONEDNN_VERIFIED_JAXLIB:
        return {}
    x = jnp.ones((8, 8), jnp.float32)
    try:
        jax.jit(jnp.matmul, compiler_options=ONEDNN_MATMUL_OPTIONS).lower(x, x).compile()
    except (jax.errors.JaxRuntimeError, ValueError):  # a jaxlib without these options
        return {}
    return dict(ONEDNN_MATMUL_OPTIONS)


_HLO_COMPUTATION = re.compile(r"^(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = .*? ([a-z][\w\-]*)\((.*?)\)", re.M)


def onednn_fusions_supported(hlo_text: str) -> bool:
    """Whether every oneDNN fusion in an optimized HLO module has the one shape known to run:
    a single dot whose two operands are fusion inputs, optionally followed by element-wise ops.

    Why: with jaxlib 0.10.2, a oneDNN fusion that also holds an op *feeding* the dot (``(a * b)
    @ c``, ``exp(a) @ c``) or a second dot compiles, then kills the process on its first run
    ("partition compile failed", SIGILL); no exception can be caught. Anything not parsed as
    that shape counts as unsupported.
    """
    if "__onednn_fusion" not in hlo_text:
        return True
    computations = {m.group(1): m.group(2) for m in _HLO_COMPUTATION.finditer(hlo_text)}
    for line in hlo_text.splitlines():
        if "__onednn_fusion" not in line:
            continue
        callee = re.search(r"calls=(%[\w.\-]+)", line)
        body = computations.get(callee.group(1)) if callee else None
        if body is None:
            return False
        ops = {name: (op, args) for name, op, args in _HLO_INSTRUCTION.findall(body)}
        dots = [args for op, args in ops.values() if op == "dot"]
        if len(dots) != 1:
            return False
        operands = re.findall(r"%[\w.\-]+", dots[0])
        if len(operands) != 2 or any(ops.get(o, ("",))[0] != "parameter" for o in operands):
            return False
    return True


class TunedJit:
    """``jax.jit(fn, **jit_kwargs)`` that compiles each program with ``compiler_options`` (default
    :func:`cpu_compiler_options`) where that is safe, and without them where it is not.

    Each new input signature (tree, avals, shardings) is compiled with the options first; if the
    optimized program holds a oneDNN fusion that :func:`onednn_fusions_supported` rejects, it is
    compiled again with XLA's defaults. ``compile(*args)`` returns the ``jax.stages.Compiled``
    that ``__call__(*args)`` runs (donation and shardings as given to ``jax.jit``).
    """

    def __init__(self, fn: Callable, *, compiler_options: Mapping[str, Any] | None = None, **jit_kwargs: Any):
        options = cpu_compiler_options() if compiler_options is None else dict(compiler_options)
        self.compiler_options = options
        self._plain = jax.jit(fn, **jit_kwargs)
        self._tuned = jax.jit(fn, compiler_options=options, **jit_kwargs) if options else None
        self._compiled: dict[Any, Any] = {}

    @staticmethod
    def _signature(args: tuple) -> Any:
        leaves, tree = jax.tree.flatten(args)
        return tree, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)

    def compile(self, *args: Any):
        key = self._signature(args)
        if key not in self._compiled:
            compiled = self._tuned.lower(*args).compile() if self._tuned is not None else None
            if compiled is None or not onednn_fusions_supported(compiled.as_text()):
                compiled = self._plain.lower(*args).compile()
            self._compiled[key] = compiled
        return self._compiled[key]

    def __call__(self, *args: Any):
        return self.compile(*args)(*args)


__all__ = ["MESH_AXES", "BATCH_AXES", "DEFAULT_RULES", "CLUSTER_PROCESS_COUNT_VARS", "COORDINATOR_VARS",
           "cluster_detected", "initialize_distributed", "make_mesh", "mesh_from_spec", "describe_mesh",
           "single_device_mesh", "logical_to_spec", "logical_sharding", "constrain", "state_shardings",
           "shard_model", "batch_sharding", "shard_batch", "replicated", "ONEDNN_MATMUL_OPTIONS", "ONEDNN_VERIFIED_JAXLIB", "cpu_compiler_options",
           "onednn_fusions_supported", "TunedJit"]
