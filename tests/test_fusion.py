"""Fusion is proved, not assumed: read the optimized HLO of the compiled model."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from pipeline.model import load_model


def optimized_hlo(batch_size: int = 32) -> str:
    model = load_model()
    x = jax.ShapeDtypeStruct((batch_size, *model.spec.shape), jnp.uint8)
    return jax.jit(model.forward).lower(model.params, x).compile().as_text()


def computations(hlo: str) -> dict[str, str]:
    """Computation name -> body text (ENTRY keyed as 'ENTRY')."""
    out = {}
    for match in re.finditer(r"^(ENTRY )?%(\S+) \(.*?\{\n(.*?)\n\}", hlo, re.M | re.S):
        out["ENTRY" if match.group(1) else match.group(2)] = match.group(3)
    return out


def entry_instructions(hlo: str) -> list[dict]:
    rows = []
    for line in computations(hlo)["ENTRY"].splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ (\w[\w-]*)\((.*?)\)(.*)", line)
        if m:
            calls = re.search(r"calls=%(\S+?),", m.group(4) + ",")
            rows.append({"name": m.group(1), "op": m.group(2),
                         "operands": re.findall(r"%(\S+?)(?:,|$)", m.group(3)),
                         "calls": calls.group(1) if calls else None, "line": line})
    return rows


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU lowering")
def test_cpu_bias_and_relu_of_each_conv_are_one_fused_loop():
    hlo = optimized_hlo()
    bodies = computations(hlo)
    entry = entry_instructions(hlo)
    convs = [i for i in entry if i["op"] == "convolution"
             or (i["calls"] and "convolution(" in bodies[i["calls"]])]
    assert len(convs) == 2, "expected two convolutions"
    for conv in convs:
        consumers = [i for i in entry if conv["name"] in i["operands"]]
        assert len(consumers) == 1, f"conv {conv['name']} feeds {len(consumers)} ops"
        fused = consumers[0]
        assert fused["op"] == "fusion" and "kind=kLoop" in fused["line"], fused["line"]
        body = bodies[fused["calls"]]
        assert " add(" in body and " maximum(" in body, "bias add and ReLU not in one fusion"
    # No bias add or ReLU left as a kernel of its own.
    assert not [i for i in entry if i["op"] in ("add", "maximum")]


@pytest.mark.gpu
def test_gpu_each_conv_is_cudnn_conv_bias_relu():
    hlo = optimized_hlo()
    fused = re.findall(r'custom_call_target="__cudnn\$convBiasActivationForward".*', hlo)
    assert len(fused) == 2, "expected both convs as fused cuDNN conv+bias+activation calls"
    assert all('"activation_mode":"kRelu"' in line for line in fused)
    assert "__cudnn$convForward" not in hlo
