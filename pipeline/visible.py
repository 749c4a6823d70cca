"""Does this node see the run's local paths?

A local ``--input`` or ``--output`` is read and written by Ray workers on every node, so on a
cluster it must be storage that every node mounts at the same path (NFS, EFS, a
ReadWriteMany volume) or an ``s3://`` URI. A node without it did not fail cleanly: it read
every input it was given as "no longer exists" (good images written off as error rows, exit
status 0), and a decode task that could not find the listing failed the run with a page of
Ray's traceback.

:class:`Witnesses` are the local paths that prove a node sees both: the listing the driver
wrote into the output, and a few inputs the driver has just listed and sees itself (all of
them missing means the input is not there; one missing means a file was removed); the
driver's own node is never asked. The driver checks every node before the run starts
(:func:`pipeline.dataflow.check_nodes_see`); a node added later checks itself when its decode
task cannot find the listing or an input, and when its actor starts. Either way the run stops
with one line naming the node and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.machine import this_node, where
from pipeline.plan import PlanError
from pipeline.read import _local_path, is_uri

# Inputs sampled from the listing: first, middle and last.
SAMPLE = 3


@dataclass(frozen=True)
class Witnesses:
    """Local paths every node working for a run must see (none for URIs)."""

    input: str  # the run's --input and --output, for messages
    output: str
    inputs: tuple[str, ...] = ()  # a few listed local inputs
    listing: str | None = None  # the listing file, when the output is local
    driver_node: str | None = None  # the Ray node of the driver, which sees what it listed

    @classmethod
    def of(cls, input: str, output: str, listing, driver_node: str | None = None) -> Witnesses:
        """The witnesses of a run's ``--input``, ``--output`` and listing (a
        :class:`pipeline.listing.ListingFile`, in the output once the run starts), for a
        driver on Ray node ``driver_node``."""
        count = listing.count
        rows = sorted({0, count // 2, count - 1}) if count else []
        inputs = []
        for i in rows[:SAMPLE]:
            path = listing.read(i, i + 1).column("path")[0].as_py()
            if is_uri(path):
                continue
            # Only what the driver sees proves anything: a list's entries are not checked
            # when it is read (a stale list, or a head node without the data mount).
            if os.path.exists(local := _local_path(path)):
                inputs.append(local)
        return cls(input, output, tuple(inputs),
                   None if is_uri(listing.uri) else _local_path(listing.uri), driver_node)

    @property
    def local(self) -> bool:
        return bool(self.inputs or self.listing)

    def unseen(self, inputs: bool = True) -> str | None:
        """Why this node cannot work for the run (one line naming it and the fix), or None.
        ``inputs``: check the inputs too (an actor only writes the output). The driver's own
        node sees what the driver saw: inputs missing there were removed after listing."""
        if self.driver_node and self.driver_node == this_node():
            return None
        if self.listing and not os.path.exists(self.listing):
            return (f"{where()} does not see the output directory '{self.output}' (the "
                    f"listing the driver wrote there is missing): " + _FIX.format("--output"))
        if inputs and self.inputs and not any(os.path.exists(p) for p in self.inputs):
            return (f"{where()} does not see the input '{self.input}' (none of the "
                    f"{len(self.inputs)} files sampled from the driver's listing, e.g. "
                    f"'{self.inputs[0]}', is there): " + _FIX.format("--input"))
        return None

    def check(self, inputs: bool = True) -> None:
        """Raise :class:`PlanError` if this node cannot work for the run."""
        problem = self.unseen(inputs)
        if problem:
            raise PlanError(problem)


_FIX = ("on a cluster, {} must be storage that every node mounts at the same path (NFS, "
        "EFS, a shared volume), or an s3:// URI")
