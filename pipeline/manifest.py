"""The manifest: what an output directory's rows were made from (input listing, model
identity, options), written before any row, and checked by ``--resume`` so that rows of
another model, listing or schema are never mixed in."""

from __future__ import annotations

import logging

from pipeline.config import RunConfig
from pipeline.fingerprint import ModelIdentity, resume_refusal
from pipeline.listing import ListingFile
from pipeline.model import Model
from pipeline.source import Source
from pipeline.write import MANIFEST, OutputDir, OutputError

log = logging.getLogger(__name__)


def prepare(out: OutputDir, cfg: RunConfig, listing: ListingFile, model: Model,
             source: Source) -> str:
    """Check a ``--resume`` against the manifest there and write this run's manifest;
    returns the fingerprint the run's rows carry."""
    identity = model.identity
    manifest = {
        "input": cfg.input,
        "inputs": listing.count,
        "listing_sha256": listing.sha256,
        "model": identity.fingerprint,
        "model_name": model.name,
        "model_identity": identity.to_json(),
        "top_k": cfg.top_k,
        "logits": cfg.logits,
        "compute_dtype": cfg.compute_dtype,
        "source": source.describe(),
    }
    before = _manifest_before(out, cfg.output) if cfg.resume else None
    if before is not None:
        check_resumable(cfg.output, before, manifest)
        if before["model"] != identity.fingerprint:  # same model under another JAX
            log.warning(
                "JAX %s traces this model to another program text than JAX %s did; weights, "
                "spec and source are unchanged, so resumed rows keep fingerprint %s",
                identity.jax, before["model_identity"].get("jax"), before["model"])
            manifest["model"] = before["model"]
            manifest["model_identity"] = before["model_identity"]
    out.write_json(MANIFEST, manifest)
    return manifest["model"]


def _manifest_before(out: OutputDir, output: str) -> dict | None:
    """The manifest a --resume continues; None for a fresh start. Parts without a readable
    manifest are refused: what made their rows is unknown, so they could be mixed in."""
    try:
        before = out.read_json(MANIFEST)
    except ValueError as e:  # JSONDecodeError
        before, why = None, f"its {MANIFEST} is not valid JSON ({e})"
    else:
        why = (f"its {MANIFEST} holds no manifest" if before is not None
               else f"it holds part files but no {MANIFEST}")
    if isinstance(before, dict):
        return before
    if out.parts() or before is not None:
        raise OutputError(f"Cannot resume into '{output}': {why}, so what made its rows is "
                          "unknown. Use --overwrite to start again.")
    return None


def check_resumable(output: str, before: dict, now: dict) -> None:
    if before.get("model") != now["model"]:
        why = resume_refusal(before.get("model_identity"), ModelIdentity(**now["model_identity"]))
        if why is not None:
            raise OutputError(
                f"Cannot resume into '{output}': its rows were made by model "
                f"{before.get('model')}, this run uses {now['model']} ({why}). Use --overwrite "
                "to start again."
            )
    if before.get("listing_sha256") != now["listing_sha256"]:
        raise OutputError(
            f"Cannot resume into '{output}': the input listing changed since that run "
            f"({before.get('inputs')} inputs then, {now['inputs']} now). Use --overwrite."
        )
    source = before.get("source", {"format": "images"})
    if source != now["source"]:  # the source decides the row ids
        raise OutputError(
            f"Cannot resume into '{output}': it was read as {source}, this run reads "
            f"{now['source']}; match it or use --overwrite."
        )
    for key in ("top_k", "logits", "compute_dtype"):  # all part files must share one schema
        if before.get(key) != now[key]:
            raise OutputError(
                f"Cannot resume into '{output}': it was written with {key}={before.get(key)}, "
                f"this run asks for {key}={now[key]}; match it or use --overwrite."
            )
