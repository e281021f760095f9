"""Multi-host start-up: ``jax.distributed.initialize`` from flags, environment or cluster.

Explicit values win; otherwise ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` are read; if none is set, JAX's own cluster detection (TPU pods, SLURM,
Open MPI, ...) decides. On CPU the collectives go through gloo.
"""

from __future__ import annotations

import os

import jax

_initialized = False
ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def requested_by_environment() -> bool:
    """Does the environment ask for a multi-process run (any of :data:`ENVIRONMENT` set)?"""
    return any(os.environ.get(name) for name in ENVIRONMENT)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    global _initialized
    if _initialized:
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    _initialized = True
