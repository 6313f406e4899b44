"""Pipeline stages with their weight-only work done once, on CPU.

Much of a stage's work depends on the weights alone: the Winograd transforms
and space-to-depth folds of the convolution kernels, the demodulation
energies, kernel layouts for the matmul forms. A jitted stage redoes it on
every call. `bind` traces a stage once per input shape and splits its program
by JAX's partial evaluation (the same split that `jax.linearize` makes): the
weight-only part runs once and its results ("residuals") are kept, and the
per-call program takes them in place of the weights. Results equal the stage's
to float32 rounding (other convolution forms, other fusions); the official
parity test passes through it.

Only on one CPU device (`hoists`): there the stages' convolutions trace their
CPU forms directly (`ops.hoisted_cpu_forms`), so the split keeps nothing for
other platforms, and take Winograd forms on smaller grids than a jitted
program does, since their kernel transforms are no longer paid per call.
Elsewhere `bind` returns the jitted stage itself.

Costs: the residuals stay in memory for as long as the bound stage lives
(residuals that are weights unchanged are the weights themselves, not copies;
equal residuals of the stages of one `Stages` are kept once), and the first
call of every input shape traces, splits and compiles two programs (the
paper config's anonymize: about 10 s more than the jitted stage's compile).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core

try:
  # No public JAX API splits a jaxpr by which inputs are known; this is the one
  # that `jax.linearize` and reverse-mode autodiff use.
  from jax._src.interpreters.partial_eval import partial_eval_jaxpr_nounits
except ImportError:  # a JAX without it: `hoists()` is False, the stages run as they are
  partial_eval_jaxpr_nounits = None

from g2face_jax import payload, pipeline
from g2face_jax.nn import ops


class SharedArrays:
  """Arrays kept once: `keep(a)` returns an equal array kept before (same shape, dtype
  and values), or keeps and returns a. The stages of one `Stages` share their
  decoder's residuals through it."""

  def __init__(self):
    self._kept: dict[tuple, list[jax.Array]] = {}

  def keep(self, a: jax.Array) -> jax.Array:
    host = np.asarray(a)
    sample = host.reshape(-1)[::max(host.size // 64, 1)].tobytes()
    candidates = self._kept.setdefault((host.shape, host.dtype.str, sample), [])
    for kept in candidates:
      if np.array_equal(np.asarray(kept), host):
        return kept
    candidates.append(a)
    return a


class _Split:
  """One input signature's programs: residuals (computed once) and the per-call part."""

  def __init__(self, stage: Callable, weights: Any, args: tuple, shared: SharedArrays):
    w_leaves, w_tree = jax.tree.flatten(weights)
    a_leaves, a_tree = jax.tree.flatten(args)
    n_w = len(w_leaves)
    out_tree = []

    def flat(*leaves):
      out = stage(jax.tree.unflatten(w_tree, leaves[:n_w]),
                  *jax.tree.unflatten(a_tree, leaves[n_w:]))
      leaves_out, tree = jax.tree.flatten(out)
      out_tree.append(tree)
      return leaves_out

    with ops.hoisted_cpu_forms():
      closed = jax.make_jaxpr(flat)(*w_leaves, *a_leaves)
    known, per_call, _, residual_avals = partial_eval_jaxpr_nounits(
        closed, [False] * n_w + [True] * len(a_leaves), instantiate=True)
    self.out_tree = out_tree[0]
    # Residuals that are weights as they are: take the weights, compute the rest.
    inputs = {v: i for i, v in enumerate(known.jaxpr.invars)}
    outvars = known.jaxpr.outvars[len(known.jaxpr.outvars) - len(residual_avals):]
    forwarded = [inputs.get(v) if isinstance(v, jex_core.Var) else None for v in outvars]
    computed = jex_core.ClosedJaxpr(
        known.jaxpr.replace(outvars=[v for v, f in zip(outvars, forwarded) if f is None]),
        known.consts)
    values = iter(jax.jit(jex_core.jaxpr_as_fun(computed))(*w_leaves))
    self.residuals = [shared.keep(next(values)) if f is None else w_leaves[f] for f in forwarded]
    self.run = jax.jit(jex_core.jaxpr_as_fun(per_call))

  def __call__(self, args: tuple):
    return jax.tree.unflatten(self.out_tree, self.run(*self.residuals, *jax.tree.leaves(args)))


def _signature(args: tuple):
  leaves, tree = jax.tree.flatten(args)
  return (tree, tuple((jax.numpy.shape(a), jax.numpy.result_type(a)) for a in leaves),
          jax.config.jax_default_matmul_precision)


class Bound:
  """`stage(nets, variables, *args, **static)` as a function of args, split per input
  signature (`splits`) into residuals computed once and a per-call program."""

  def __init__(self, stage: Callable, nets, variables, static: dict,
               shared: SharedArrays | None = None):
    self._traced = lambda v, *args: stage.__wrapped__(nets, v, *args, **static)
    self._variables = variables
    self._shared = SharedArrays() if shared is None else shared
    self.splits: dict[Any, _Split] = {}

  def __call__(self, *args):
    key = _signature(args)
    if key not in self.splits:
      self.splits[key] = _Split(self._traced, self._variables, args, self._shared)
    return self.splits[key](args)

  def residuals(self) -> dict[int, jax.Array]:
    """The residuals of every split that are not weights, by id (each array once)."""
    weights = {id(w) for w in jax.tree.leaves(self._variables)}
    return {id(r): r for s in self.splits.values() for r in s.residuals if id(r) not in weights}


def residual_bytes(*bound: Callable) -> int:
  """Memory held by the residuals of these `bind` results (each array once; 0 for a
  stage that is not a `Bound`)."""
  arrays = {}
  for b in bound:
    if isinstance(b, Bound):
      arrays.update(b.residuals())
  return sum(a.nbytes for a in arrays.values())


def bind(stage: Callable, nets: pipeline.Networks, variables: pipeline.Variables,
         shared: SharedArrays | None = None, **static) -> Callable:
  """`lambda *args: stage(nets, variables, *args, **static)`, as a `Bound` on CPU (the
  weight-only work done once per input signature), elsewhere as it is.

  `stage`: a jitted pipeline stage (`pipeline.analyze`, `anonymize`,
  `extract_identity`, `restore`: none calls another jitted function that
  convolves), whose undecorated function is traced; any other callable is
  called as it is. `shared`: where residuals equal to other stages' are found and
  kept (default: this stage's own). `static`: its static keyword arguments (dtype,
  micro_batch).
  """
  if not hoists() or not hasattr(stage, "__wrapped__"):
    return functools.partial(stage, nets, variables, **static)
  return Bound(stage, nets, variables, static, shared)


def hoists() -> bool:
  """Whether `bind` hoists here: on one CPU device (the stages' split over several
  devices, `shard_map`, is left as it is), with a JAX that has the partial evaluation."""
  return (partial_eval_jaxpr_nounits is not None and jax.default_backend() == "cpu"
          and jax.device_count() == 1)


class Stages:
  """The pipeline's stages bound to one set of networks and variables, each through
  `bind` (`hoisted`, the default) or the jitted stage as it is.

  Same arguments and results as the `pipeline` functions of the same names, less
  `nets` and `variables`; `dtype` and `micro_batch` are fixed here for all stages.
  """

  def __init__(self, nets: pipeline.Networks, variables: pipeline.Variables, *,
               dtype: str = "float32", micro_batch: int | None = None, hoisted: bool = True):
    wrap = functools.partial(bind, shared=SharedArrays()) if hoisted else functools.partial
    typed = dict(dtype=dtype, micro_batch=micro_batch)
    self.analyze = wrap(pipeline.analyze, nets, variables, micro_batch=micro_batch)
    self.anonymize = wrap(pipeline.anonymize, nets, variables, **typed)
    self.extract_identity = wrap(pipeline.extract_identity, nets, variables, **typed)
    self.restore = wrap(pipeline.restore, nets, variables, **typed)

  def residual_bytes(self) -> int:
    """Memory the stages' residuals hold beyond the weights (`hoist.residual_bytes`)."""
    return residual_bytes(self.analyze, self.anonymize, self.extract_identity, self.restore)

  def official_anonymize(self, x: jax.Array, z: jax.Array,
                         noise: Sequence[jax.Array]) -> dict[str, jax.Array]:
    """`pipeline.official_anonymize` as three calls: analyze, the bits, anonymize."""
    out = dict(self.analyze(x))
    out["hide_bits"] = payload.float_to_bits(out["arc_id"])
    out.update(self.anonymize(x, out["coeff"], z, out["hide_bits"], list(noise)))
    return out

  def official_recover(self, anon: jax.Array, hide_bits: jax.Array,
                       noise: Sequence[jax.Array]) -> dict[str, jax.Array]:
    """`pipeline.official_recover` as two calls: extract_identity, restore."""
    out = dict(self.extract_identity(anon))
    out.update(self.restore(anon, out["extracted_id"], hide_bits, list(noise)))
    return out
