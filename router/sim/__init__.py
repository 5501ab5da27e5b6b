"""A simulated SGLang v0.5.12 worker (native HTTP API) for the demo, the tests and the benchmarks."""

from router.sim.app import SimStats, SimWorker, serve_sim_worker
from router.sim.model import Faults, SimModel, SimOptions

__all__ = ["Faults", "SimModel", "SimOptions", "SimStats", "SimWorker", "serve_sim_worker"]
