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
            calls = re.search(r"(?:calls|to_apply)=%(\S+?),", m.group(4) + ",")
            rows.append({"name": m.group(1), "op": m.group(2),
                         "operands": re.findall(r"%(\S+?)(?:,|$)", m.group(3)),
                         "calls": calls.group(1) if calls else None, "line": line})
    return rows


def loop_fusion(instruction: dict, bodies: dict[str, str]) -> tuple[str, str]:
    """(its line, its fused computation) of a kLoop fusion; older XLA:CPU (JAX 0.6.2) wraps one
    that it splits over threads in a call: ``call(...), to_apply=%parallel_..._fusion``,
    whose computation is that fusion alone."""
    line = instruction["line"]
    if instruction["op"] == "call":
        line = bodies[instruction["calls"]].strip().splitlines()[-1]  # its ROOT
        assert "ROOT" in line, line
    assert " fusion(" in line and "kind=kLoop" in line, f"not one fused loop: {line}"
    return line, bodies[re.search(r"calls=%([^,\s]+)", line).group(1)]


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
        line, body = loop_fusion(consumers[0], bodies)
        assert " add(" in body and " maximum(" in body, f"bias add and ReLU not in {line}"
    # No bias add or ReLU left as a kernel of its own.
    assert not [i for i in entry if i["op"] in ("add", "maximum")]


# The two forms in which current XLA:GPU emits a conv + bias + ReLU as one cuDNN kernel:
# - a custom call to cuDNN's fused conv (the conv rewriter's "runtime fusion"), e.g.
#   custom-call(%x, %w, %b), custom_call_target="__cudnn$convBiasActivationForward",
#   backend_config={..."cudnn_conv_backend_config":{..."activation_mode":"kRelu"...}}
# - a cuDNN graph fusion: an instruction fusion(...), kind=kCustom, calls=%c,
#   backend_config={"fusion_backend_config":{"kind":"__cudnn$fusion",...}} whose computation
#   %c holds the convolution, the bias add and the maximum.
FUSED_CALL = "__cudnn$convBiasActivationForward"
RELU = re.compile(r'"activation_mode"\s*:\s*"kRelu"')
CUDNN_FUSION = re.compile(r'"kind"\s*:\s*"__cudnn\$fusion"')


def cudnn_conv_forms(hlo: str) -> dict[str, list[str]]:
    """Every convolution of an optimized GPU module, by form: ``fused_call`` (cuDNN's fused
    conv+bias+ReLU custom call), ``graph_fusion`` (a __cudnn$fusion computation holding
    conv, add and maximum), ``other`` (any other conv: unfused, or fused without ReLU).
    Looks in every computation: XLA may wrap kernels in command-buffer calls."""
    bodies = computations(hlo)
    forms: dict[str, list[str]] = {"fused_call": [], "graph_fusion": [], "other": []}
    fused_bodies = set()
    for body in bodies.values():
        for line in body.splitlines():
            if 'custom_call_target="__cudnn$conv' in line:
                fused = FUSED_CALL in line and RELU.search(line)
                forms["fused_call" if fused else "other"].append(line.strip())
            elif " fusion(" in line and CUDNN_FUSION.search(line):
                called = re.search(r"calls=%([^,\s]+)", line).group(1)
                inner = bodies[called]
                if "convolution(" not in inner:
                    continue  # a cuDNN fusion of something else (a dot)
                fused_bodies.add(called)
                fused = " add(" in inner and " maximum(" in inner
                forms["graph_fusion" if fused else "other"].append(line.strip())
    for name, body in bodies.items():
        if name not in fused_bodies:
            forms["other"] += [line.strip() for line in body.splitlines()
                               if " convolution(" in line]
    return forms


@pytest.mark.gpu
def test_gpu_each_conv_is_one_cudnn_conv_bias_relu():
    forms = cudnn_conv_forms(optimized_hlo())
    assert not forms["other"], f"a conv not fused with its bias and ReLU: {forms['other']}"
    assert len(forms["fused_call"]) + len(forms["graph_fusion"]) == 2, forms


_CUSTOM_CALL_HLO = """HloModule m

ENTRY %main (p0: f32[8,32,32,1], p1: f32[3,3,1,32], p2: f32[32]) -> f32[8,16,16,32] {
  %p0 = f32[8,32,32,1]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,1,32]{3,2,1,0} parameter(1)
  %p2 = f32[32]{0} parameter(2)
  %cudnn-conv-bias-activation = (f32[8,16,16,32]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1, %p2), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBiasActivationForward", backend_config={"operation_queue_id":"0","cudnn_conv_backend_config":{"activation_mode":"kRelu","conv_result_scale":1}}
  ROOT %get-tuple-element = f32[8,16,16,32]{3,2,1,0} get-tuple-element(%cudnn-conv-bias-activation), index=0
}
"""

_GRAPH_FUSION_HLO = """HloModule m

%fused_conv (p0: f32[8,32,32,1], p1: f32[3,3,1,32], p2: f32[32]) -> f32[8,16,16,32] {
  %p0 = f32[8,32,32,1]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,1,32]{3,2,1,0} parameter(1)
  %conv = f32[8,16,16,32]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_01io->b01f
  %p2 = f32[32]{0} parameter(2)
  %bias = f32[8,16,16,32]{3,2,1,0} broadcast(%p2), dimensions={3}
  %add = f32[8,16,16,32]{3,2,1,0} add(%conv, %bias)
  %zero = f32[] constant(0)
  %zeros = f32[8,16,16,32]{3,2,1,0} broadcast(%zero), dimensions={}
  ROOT %relu = f32[8,16,16,32]{3,2,1,0} maximum(%add, %zeros)
}

ENTRY %main (p0: f32[8,32,32,1], p1: f32[3,3,1,32], p2: f32[32]) -> f32[8,16,16,32] {
  %p0 = f32[8,32,32,1]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,1,32]{3,2,1,0} parameter(1)
  %p2 = f32[32]{0} parameter(2)
  ROOT %fusion = f32[8,16,16,32]{3,2,1,0} fusion(%p0, %p1, %p2), kind=kCustom, calls=%fused_conv, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__cudnn$fusion","cudnn_fusion_config":{"plan_id":"3"}}}
}
"""


def test_gpu_form_reader_on_written_modules():
    """The reader the GPU test relies on, on hand-written modules of both fused forms (in
    XLA's text format), and on the unfused forms it must reject (runs on any machine)."""
    call = cudnn_conv_forms(_CUSTOM_CALL_HLO)
    assert len(call["fused_call"]) == 1 and not call["graph_fusion"] and not call["other"]
    graph = cudnn_conv_forms(_GRAPH_FUSION_HLO)
    assert len(graph["graph_fusion"]) == 1 and not graph["fused_call"] and not graph["other"]
    no_relu = _CUSTOM_CALL_HLO.replace('"kRelu"', '"kNone"')
    assert len(cudnn_conv_forms(no_relu)["other"]) == 1
    plain = _CUSTOM_CALL_HLO.replace("convBiasActivationForward", "convForward")
    assert len(cudnn_conv_forms(plain)["other"]) == 1
    no_max = _GRAPH_FUSION_HLO.replace("maximum(%add, %zeros)", "add(%add, %zeros)")
    assert len(cudnn_conv_forms(no_max)["other"]) == 1
