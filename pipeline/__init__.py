"""Offline batch image inference on Ray Data with a jitted JAX/XLA model.

Public API: :func:`run` (the pipeline), :func:`load_model` (the model without Ray),
:class:`RunConfig`, :class:`Model`, :class:`ModelSpec`, :class:`Summary`.
"""

from pipeline.config import RunConfig
from pipeline.model import Model, ModelError, ModelSpec, load_model
from pipeline.runner import Summary, run

__all__ = ["Model", "ModelError", "ModelSpec", "RunConfig", "Summary", "load_model", "run"]
