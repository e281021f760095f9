"""Train state as a plain pytree, built abstractly and initialised straight into its shards.

``state = {"step", "params", "opt_state", "rest"}`` where ``params``/``rest`` are pure dicts
of the model's ``nnx.Param`` and other variables (the functional NNX split), plus
``"loss_scale"`` under float16 compute (:mod:`jaxsparse.train.loss_scale`). Checkpoints are
therefore readable without jaxsparse, and the step is a pure function ``jax.jit`` can shard.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsparse.config import Config
from jaxsparse.models import build
from jaxsparse.parallel import param_shardings
from jaxsparse.parallel.rules import get_preset
from jaxsparse.train.loss_scale import initial_loss_scale, uses_loss_scale
from jaxsparse.train.optim import make_optimizer


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path(path) -> tuple[str, ...]:
    return tuple(_key_str(k) for k in path)


def _opt_state_shardings(abstract_opt_state, params_shardings, abstract_params, mesh):
    """Optimiser moments mirror the params: give each leaf the sharding of the param whose
    path is a suffix of its own path (and whose shape matches); counters are replicated."""
    by_path = {}
    flat_sh = jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    flat_abs = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for (path, sharding), (_, leaf) in zip(flat_sh, flat_abs):
        by_path[_path(path)] = (sharding, leaf.shape)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = _path(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def decay_mask(abstract_params: nnx.State):
    """Which parameters get weight decay: a parameter's ``weight_decay`` metadata if it has
    one (Mamba's A_log, D and dt bias say False), else matrices yes, vectors no."""

    def one(variable):
        explicit = variable.get_metadata().get("weight_decay")
        return bool(explicit) if explicit is not None else variable.get_value().ndim >= 2

    return nnx.to_pure_dict(jax.tree.map(one, abstract_params,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def optimizer_groups(abstract_params: nnx.State):
    """Each parameter's ``optimizer_group`` metadata ("default" when it has none), e.g.
    product-key memory values, which train with their own learning rate."""

    def one(variable):
        return variable.get_metadata().get("optimizer_group") or "default"

    return nnx.to_pure_dict(jax.tree.map(one, abstract_params,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def learned_statistics(model: nnx.Module) -> dict:
    """The part of a model's non-parameter state its weights were trained with — routing
    attention's k-means centroids and the running mean of its keys, a random MoE router's
    fixed kernel — as a pure dict: what a run started from another's weights
    (``train.init_from``) keeps besides the parameters. Counters of schedules (the Hydra
    curriculum's step, MoE router and routing warm-up steps) are not among them: they restart
    with the new run's step 0."""
    from jaxsparse.nn.moe import FixedRouterKernel
    from jaxsparse.nn.routing import Centroids, RoutingMean

    return nnx.to_pure_dict(nnx.state(model, nnx.Any(Centroids, RoutingMean, FixedRouterKernel)))


def schedule_counters(abstract_rest: nnx.State) -> dict:
    """Which leaves of the non-parameter state count training steps for a schedule — the
    Hydra curriculum's step, MoE router steps (the k schedule and jitter noise), routing
    attention's dense warm-up step — as a pure dict of bools shaped like ``state["rest"]``.
    (The MoE router's noise key is a ``RouterStep`` too; training never changes it.)"""
    from jaxsparse.models.hydra import CurriculumStep
    from jaxsparse.nn.moe import RouterStep
    from jaxsparse.nn.routing import RoutingStep

    def one(variable):
        return isinstance(variable, CurriculumStep | RouterStep | RoutingStep)

    return nnx.to_pure_dict(jax.tree.map(one, abstract_rest,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _overlay(base: dict, extra: dict) -> dict:
    """``base`` (a nested pure dict) with the leaves of ``extra`` put in at their paths."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _overlay(base[key], value) if isinstance(value, dict) else value
    return merged


@dataclasses.dataclass
class TrainSetup:
    """Everything derived from a config and a mesh: structure, shardings, optimiser."""

    cfg: Config
    mesh: Mesh

    def __post_init__(self):
        cfg = self.cfg
        self.rules = get_preset(cfg.mesh.preset).rules  # logical name -> mesh axes
        abstract_model = nnx.eval_shape(lambda: build(cfg.model, nnx.Rngs(cfg.train.seed)))
        self.graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
        self.params_template, self.rest_template = abs_params, abs_rest
        self.tx = make_optimizer(cfg.optimizer, cfg.train.steps, decay_mask(abs_params),
                                 groups=optimizer_groups(abs_params))
        params_sh = param_shardings(abs_params, self.mesh, self.rules)
        rest_sh = param_shardings(abs_rest, self.mesh, self.rules)
        abstract = jax.eval_shape(self._init)
        self.state_shardings = {
            "step": NamedSharding(self.mesh, PartitionSpec()),
            "params": params_sh,
            "opt_state": _opt_state_shardings(abstract["opt_state"], params_sh,
                                              abstract["params"], self.mesh),
            "rest": rest_sh,
        }
        if "loss_scale" in abstract:
            self.state_shardings["loss_scale"] = jax.tree.map(
                lambda _: NamedSharding(self.mesh, PartitionSpec()), abstract["loss_scale"])
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract, self.state_shardings)

    def _init(self):
        model = build(self.cfg.model, nnx.Rngs(self.cfg.train.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": self.tx.init(params), "rest": nnx.to_pure_dict(rest)}
        if uses_loss_scale(self.cfg.model.dtype):
            state["loss_scale"] = initial_loss_scale()
        return state

    def init(self):
        """Initialise directly into the shards (no host ever holds the full model)."""
        return jax.jit(self._init, out_shardings=self.state_shardings)()

    def init_with_params(self, params, statistics=None):
        """A fresh state (step 0, new optimiser state) around given parameters, which must
        have this config's structure and shapes, and the learned ``statistics`` (a part of
        ``rest`` with its paths, see :func:`learned_statistics`) in place of fresh ones."""
        expected = jax.tree.map(lambda a: (a.shape, a.dtype), self.abstract_state["params"])
        got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
        if expected != got:
            raise ValueError(f"parameters do not match the model of config {self.cfg.name!r}: "
                             f"expected {expected}, got {got}")

        def init(params, statistics):
            state = self._init()
            rest = _overlay(state["rest"], statistics or {})
            return state | {"params": params, "opt_state": self.tx.init(params), "rest": rest}

        # placed on this mesh first: they may come from another (``load`` restores a source
        # run onto one device), and jit refuses inputs on other devices than its outputs
        params = jax.device_put(params, self.state_shardings["params"])
        statistics = jax.device_put(statistics, NamedSharding(self.mesh, PartitionSpec()))
        return jax.jit(init, out_shardings=self.state_shardings)(params, statistics)

    def model(self, params, rest=None):
        """An NNX model holding ``params`` (pure dict); usable inside or outside jit."""
        p = jax.tree.map(lambda x: x, self.params_template)
        nnx.replace_by_pure_dict(p, params)
        r = jax.tree.map(lambda x: x, self.rest_template)
        if rest:
            nnx.replace_by_pure_dict(r, rest)
        return nnx.merge(self.graphdef, p, r)

    @property
    def batch_sharding(self) -> NamedSharding:
        from jaxsparse.parallel import logical_to_spec

        spec = logical_to_spec(("batch", "length"), (self.cfg.data.batch_size, self.cfg.data.seq_len),
                               self.mesh, self.rules)
        return NamedSharding(self.mesh, spec)

    def global_batch(self, local: dict) -> dict:
        """Assemble process-local rows into global arrays sharded over the batch axes."""
        sharding = self.batch_sharding
        shape = (self.cfg.data.batch_size, self.cfg.data.seq_len)
        return {k: jax.make_array_from_process_local_data(sharding, v, shape)
                for k, v in local.items()}


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = ["TrainSetup", "count_params"]
