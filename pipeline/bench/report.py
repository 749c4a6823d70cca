"""The bench's (and gpu-check's) result as the tables the CLI prints."""

from __future__ import annotations

from typing import Any


def format_report(result: dict[str, Any]) -> str:
    """Every section present in ``result``, in the order they were measured."""
    parts = [_header(result), _seed(result.get("seed")), _cost(result),
             _sweep(result.get("sweep")), _precision(result.get("precision")),
             _stage(result.get("model_stage")), _stage(result.get("predictor")),
             _limit(result.get("limits")), _end_to_end(result.get("end_to_end")),
             _memory(result.get("memory_scaling"))]
    return "\n\n".join("\n".join(p) for p in parts if p)


def _header(result: dict) -> list[str]:
    lines = [f"NOTE {n}" for n in result.get("notes", [])]
    model, setup = result.get("model"), result.get("setup")
    if model and setup:
        width, height = setup["image_size"]
        outputs = (f"{model['classes']}-d embeddings" if model.get("output") == "embedding"
                   else f"{model['classes']} classes")
        lines.append(f"Model {model['name']} ({model['input']}, {outputs}) on "
                     f"the {setup['workload']} workload (JPEGs {width}x{height}); device batch "
                     f"{setup['device_batch']} (the plan's), unit {setup['batch_size']}")
    return lines


def _seed(seed: dict | None) -> list[str]:
    if not seed:
        return []
    lines = [f"Seed table — bundled CNN on {seed['device']}, {seed['images']} images, "
             f"batch {seed['batch_size']} (median ms per image)",
             "  BEFORE (per image, op by op)      AFTER (batch, one compiled program)"]
    before = list(seed["before_ms_per_image"].items())
    after = list(seed["after_ms_per_image"].items())
    for i in range(max(len(before), len(after))):
        left = f"{before[i][0]:<14}{before[i][1]:>9.4f}" if i < len(before) else ""
        right = f"{after[i][0]:<14}{after[i][1]:>9.4f}" if i < len(after) else ""
        lines.append(f"  {left:<34}{right}")
    lines.append(f"  {'total':<14}{seed['before_total_ms_per_image']:>9.4f}          "
                 f"{'total':<14}{seed['after_total_ms_per_image']:>9.4f}")
    lines.append(f"  speedup per image: {seed['speedup']:.1f}x")
    return lines


def _cost(result: dict) -> list[str]:
    cost, decode = result.get("model_cost"), result.get("decode")
    lines = []
    if decode:
        lines.append(f"Decode — {decode['ms_per_image']:.3f} ms per image on one core "
                     f"(decode_image on {decode['files']} of the workload's files, median)")
    if cost:
        lines.append(f"Model — {cost['ms_per_image']:.4f} ms per image = "
                     f"{cost['images_per_second']:,.0f} images/s on {cost['device']} at device "
                     f"batch {cost['device_batch']} ({cost['images']} images, compiled in "
                     f"{cost['compile_seconds']:.2f} s)")
    return lines


def _sweep(sweep: dict | None) -> list[str]:
    if not sweep:
        return []
    lines = [f"Device-batch sweep — model images/s per device batch ({sweep['images']} images; "
             "each size compiled once)", f"  {'batch':>7}{'images/s':>12}{'ms/image':>11}"]
    for row in sweep["rows"]:
        lines.append(f"  {row['device_batch']:>7}{row['images_per_second']:>12,.0f}"
                     f"{row['ms_per_image']:>11.4f}" + ("  the plan's" if row.get("plan") else ""))
    lines.append(f"  within 5% of the best from device batch {sweep['saturates_at']}")
    return lines


def _precision(p: dict | None) -> list[str]:
    if not p:
        return []
    if "min_cosine" in p:
        how = (f"embeddings agree (cosine >= 0.99) on {p['agreement']:.1%} of {p['compared']} "
               f"images (lowest cosine {p['min_cosine']:.5f})")
    else:
        how = (f"top-1 agrees on {p['agreement']:.1%} of {p['compared']} images (top-1 score "
               f"moves by up to {p['max_top1_score_diff']:.3g})")
    return [f"bfloat16 vs float32 — on {p['device']}: float32 "
            f"{p['float32_images_per_second']:,.0f} images/s, bfloat16 "
            f"{p['bfloat16_images_per_second']:,.0f} ({p['speedup']:.2f}x); {how}"]


def _stage(stage: dict | None) -> list[str]:
    if not stage:
        return []
    return [f"Model stage ({stage['where']}) — {stage['images']} decoded images in "
            f"{stage['block_rows']}-row blocks: bare compiled model "
            f"{stage['bare_images_per_second']:,.0f} images/s, pipeline Predictor "
            f"{stage['predictor_images_per_second']:,.0f} images/s ({stage['ratio']:.2f}x); "
            f"same answers: {'yes' if stage['same_answers'] else 'NO'}"]


def _limit(limit: dict | None) -> list[str]:
    if not limit:
        return []
    return [f"Limit — at best {limit['limit_images_per_second']:,.0f} images/s on this machine "
            f"= {limit['formula']} ({limit['bound']}-bound)"]


def _end_to_end(e2e: dict | None) -> list[str]:
    if not e2e:
        return []
    width, height = e2e["image_size"]
    lines = [f"End to end — {e2e['images']} JPEGs of the {e2e['workload']} workload, "
             f"{width}x{height}, median of {e2e['repeats']} interleaved runs, device batch "
             f"{e2e['device_batch']}",
             f"  {'contestant':<12}{'images/s':>10}{'of limit':>10}{'seconds':>9}"
             f"{'ray init s':>11}{'data start s':>13}{'peak RSS MB':>13}"]
    shares = e2e.get("fraction_of_limit", {})
    for name, m in e2e["median"].items():
        share = f"{shares[name]:.0%}" if name in shares else "-"
        lines.append(f"  {name:<12}{m['images_per_second']:>10,.0f}{share:>10}{m['seconds']:>9.2f}"
                     f"{m['init_seconds']:>11.2f}{m['data_start_seconds']:>13.2f}"
                     f"{m['peak_rss_mb']:>13.0f}")
    ratios = [f"pipeline / {other}: {e2e[f'ratio_vs_{other}']:.2f}x"
              for other in ("loop", "ray_recipe") if f"ratio_vs_{other}" in e2e]
    if "pipeline" in shares:
        ratios.append(f"pipeline / limit: {shares['pipeline']:.2f}")
    lines.append("  " + "   ".join(ratios))
    if "first_job_ratio_vs_loop" in e2e:
        lines.append("  a cluster's first Ray Data job also starts its data actors: pipeline / "
                     f"loop {e2e['first_job_ratio_vs_loop']:.2f}x with that time counted")
    agreement = e2e.get("agreement_vs_loop")
    if agreement:
        lines.append("  answers (top-1 labels, or embeddings within cosine 0.999) agree with "
                     "the loop's: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in agreement.items()))
    pipeline = e2e["median"].get("pipeline", {})
    if pipeline.get("first_result_seconds") is not None:
        lines.append(f"  pipeline: first result {pipeline['first_result_seconds']:.2f}s after "
                     "pipeline.run() began; its plan's device batch "
                     f"{e2e.get('pipeline_device_batch')}")
    return lines


def _memory(scale: dict | None) -> list[str]:
    if not scale:
        return []
    return [f"Memory — pipeline peak RSS {scale['peak_rss_mb']:.0f} MB on {scale['images']} "
            f"images, {scale['scaled_peak_rss_mb']:.0f} MB on {scale['factor']}x as many "
            f"({scale['ratio']:.2f}x)"]
