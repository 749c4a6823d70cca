"""``batch-infer``: run, report, demo, train, sample-data, bench, gpu-check.

Every flag of ``run`` maps to one :class:`pipeline.config.RunConfig` field; the Ray Job
entrypoint (``jobs/batch_infer.py``) reuses :func:`add_run_arguments` so the two never drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import platform
import re
import signal
import sys
import tempfile
from pathlib import Path

from pipeline.config import INPUT_FORMATS, PLATFORMS, ConfigError, RunConfig
from pipeline.crash_guard import StorageHung
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.device import DeviceFailure
from pipeline.listing import InputError
from pipeline.model import ModelError
from pipeline.plan import PlanError
from pipeline.platforms import DeviceError
from pipeline.write import OutputError, WriteFailure

USER_ERRORS = (ConfigError, InputError, OutputError, ModelError, PlanError, DeviceError)
RUN_ERRORS = (DeviceFailure, StorageHung, WriteFailure)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, metavar="SRC",
                   help="directory (recursive; hidden names like a Mac's ._IMG_1.jpg are "
                   "skipped and counted), single file, glob ('imgs/**/*.png'), or "
                   "s3://bucket/prefix")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="directory (or s3:// URI) for part-*.parquet and, beside them, "
                   "_listing.arrow, _manifest.json, _summary.json and _report.html")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="images",
                   help="images: one row per image file; tar: webdataset tar shards (.tar, "
                   ".tar.gz), one row per sample, path SHARD/MEMBER; parquet: files with an "
                   "image-bytes column, one row per table row, path FILE/ID (default: images)")
    p.add_argument("--input-list", action="store_true",
                   help="--input is a file listing the inputs instead: one path or URI per line "
                   "(.txt), a 'path' column or 'bucket' and 'key' columns (.csv, .parquet, "
                   ".orc; also .gz), or an S3 Inventory report's manifest.json (each object's "
                   "latest version). Taken in its order; a path listed again is read once. "
                   "The way to feed tens of millions of objects")
    p.add_argument("--image-column", default="image", metavar="NAME",
                   help="parquet: the column of encoded image bytes (default: image)")
    p.add_argument("--id-column", default="id", metavar="NAME",
                   help="parquet: the column of unique row ids (default: id)")
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint for the model factory: a file or folder, or an s3:// URI "
                   "(copied once per machine to ~/.cache/batch-infer/models; default: the "
                   "bundled digits CNN)")
    p.add_argument("--model-fn", metavar="MODULE:FUNCTION",
                   help="model factory returning pipeline.Model (default: "
                   "pipeline.models.digits_cnn:build). Bundled: pipeline.models.resnet:build "
                   "(ResNet-50, torchvision/timm weights), pipeline.models.vit:build and "
                   ":build_swag (torchvision ViTs), pipeline.models.timm_vit:build (timm "
                   "ViTs), pipeline.models.clip:build (CLIP image embeddings from a Hugging "
                   "Face snapshot)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="the model's batch: the unit of padding and of error isolation, "
                   "compiled once (default: 32)")
    p.add_argument("--actors", type=int,
                   help="inference actors, all asked for at once (default: one per GPU with "
                   "--gpus-per-actor, or per GPU the autoscaler may add where it publishes its "
                   "ceiling; else one per node)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G",
                   help="GPUs per inference actor, fractions allowed; an actor with several "
                   "shards each device batch over them (default: 0, CPU)")
    p.add_argument("--platform", choices=PLATFORMS,
                   help="JAX platform the actors compute on (default: gpu with --gpus-per-actor, "
                   "else cpu; an actor that finds no such device stops the run). --platform cpu "
                   "with --gpus-per-actor reserves GPUs but computes on the CPU, on purpose: for "
                   "testing GPU placement without GPUs")
    p.add_argument("--device-batch-size", type=int, metavar="N",
                   help="rows per device call, a multiple of --batch-size; each actor compiles it "
                   "beside the --batch-size program (default: --batch-size on CPU; on GPU, from "
                   "the model's FLOPs, see the plan in _summary.json)")
    p.add_argument("--top-k", type=int, default=5,
                   help="classes kept per row, at most the model's classes (default: 5)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the model's arithmetic: weights cast once at load, "
                   "normalisation layers kept float32, outputs float32 (bfloat16 pays off on "
                   "H100/A100 GPUs; default: float32)")
    p.add_argument("--logits", action="store_true",
                   help="also write each row's raw (pre-softmax) scores as a 'logits' column "
                   "(classification models)")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="replace results already in --output")
    mode.add_argument("--resume", action="store_true",
                      help="finish an interrupted run into --output: committed rows are kept, "
                      "not redone")
    p.add_argument("--rows-per-file", type=int, default=10_000,
                   help="most rows per Parquet part file; a part holds one block's rows at most "
                   "(default: 10000)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images larger than this (decompression bombs; default: "
                   f"{DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--decode-timeout", type=float, default=RunConfig.decode_timeout,
                   metavar="SECONDS",
                   help="a file that takes longer to read and decode is taken to hang its "
                   "decoder or its storage (a stuck mount): its decode process is killed and, "
                   "after a second time, the file is an error row (default: %(default)g; "
                   "raise it for huge JPEG 2000 or TIFF files)")
    p.add_argument("--infer-timeout", type=float, default=None, metavar="SECONDS",
                   help="a device call that gives no result for this long is taken to hang "
                   "(a stuck GPU, a model in an endless loop): its actor is killed and Ray "
                   "retries its blocks; an image that hangs the model twice is an error row, a "
                   "device that hangs at start stops the run (default: 50 x the model's first "
                   "call, at least 120)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's own log lines and the pipeline's INFO logs (default: "
                   "Ray's lines go to a file in its session directory, named in the output)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no live status line (default: one, updated in place on a terminal and "
                   "printed every 10 s into a log)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    try:
        return _config(args)
    except ConfigError as e:  # say the flags a command line knows, not RunConfig's fields
        names = "|".join(f.name for f in dataclasses.fields(RunConfig))
        raise ConfigError(re.sub(rf"\b({names})\b", lambda m: "--" + m[1].replace("_", "-"),
                                 str(e))) from None


def _config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        input=args.input, output=args.output, model=args.model, model_fn=args.model_fn,
        batch_size=args.batch_size, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        platform=args.platform, device_batch_size=args.device_batch_size,
        top_k=args.top_k, logits=args.logits, compute_dtype=args.compute_dtype,
        address=args.address, overwrite=args.overwrite, resume=args.resume,
        rows_per_file=args.rows_per_file, max_pixels=args.max_pixels, progress=args.progress,
        decode_timeout=args.decode_timeout, infer_timeout=args.infer_timeout,
        input_format=args.input_format, input_list=args.input_list,
        image_column=args.image_column, id_column=args.id_column,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline import console

    console.run(config_from_args(args), verbose=args.verbose)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from pipeline import console
    from pipeline.digits import write_samples

    work = Path(args.dir or tempfile.mkdtemp(prefix="batch-infer-demo-"))
    images, output = work / "images", work / "predictions"
    write_samples(images, args.count)
    print(f"wrote {args.count} sample digit images to {images}")
    cfg = RunConfig(input=str(images), output=str(output), overwrite=True, actors=args.actors)
    console.run(cfg, verbose=args.verbose)
    table = pq.read_table(output, columns=["path", "status", "label_name"])
    rows = table.to_pylist()
    right = sum(r["status"] == "ok" and Path(r["path"]).parent.name == r["label_name"] for r in rows)
    print(f"accuracy on the sample digits: {right}/{len(rows)} = {right / len(rows):.1%}")
    print(f"read it: python -c \"import pyarrow.parquet as pq; print(pq.read_table('{output}'))\"")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import train

    if args.epochs < 1 or args.copies < 1:
        raise ConfigError(
            f"--epochs and --copies must be at least 1, got {args.epochs} and {args.copies}")
    metrics = train(args.output, epochs=args.epochs, copies=args.copies, seed=args.seed)
    print(json.dumps(metrics, indent=2))
    print(f"model written to {args.output}; use it with: batch-infer run --model {args.output} ...")
    return 0


def cmd_sample_data(args: argparse.Namespace) -> int:
    from pipeline.digits import write_samples

    files = write_samples(args.dir, args.count, seed=args.seed)
    print(f"wrote {len(files)} images to {args.dir} (DIR/<true label>/<name>.<ext>)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import bench, format_report

    result = bench(images=args.images, repeats=args.repeats, seed_images=args.seed_images,
                   work=args.work, end_to_end_run=not args.no_end_to_end,
                   model_images=args.model_images, memory_factor=args.memory_factor,
                   model_fn=args.model_fn, model=args.model, workload=args.workload,
                   image_size=args.image_size, sweep=args.sweep, precision=not args.no_bf16)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from pipeline.bench.gpu_check import format_check, gpu_check

    result = gpu_check(quick=args.quick, work=args.work, model_fn=args.model_fn,
                       model=args.model, photos=args.photos, run_tests=not args.skip_tests)
    print(format_check(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0 if result["ok"] else 1


def _image_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not int(width) or not int(height):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 480x360, got {text!r}")
    return int(width), int(height)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(s < 32 or s % 32 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected device batches that are multiples of 32, such as 32,64,128, got {text!r}")
    return sizes


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import load_summary, render_html, render_text

    summary = load_summary(args.output)
    print(render_text(summary), end="")
    if args.html:
        Path(args.html).write_text(render_html(summary))
        print(f"page written to {args.html}")
    return 0


class _Version(argparse.Action):
    """--version: :func:`versions`, looked up only when asked for."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


def versions() -> str:
    """'batch-infer 0.1.0 (python 3.11.7, ray 2.60.0, jax 0.10.2, ...)', read from the installed
    packages' metadata: nothing is imported, and no device is started."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    parts = [f"python {platform.python_version()}",
             *(f"{name} {version(name)}" for name in _REPORTED)]
    return f"batch-infer {version('batch-infer')} ({', '.join(parts)})"


# What a bug report needs beside our own version: what runs the pipeline and what decodes.
_REPORTED = ("ray", "jax", "jaxlib", "numpy", "pyarrow", "pillow", "pillow-heif")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch-infer",
        description="Offline batch image inference on Ray Data with a jitted JAX model. "
        "One Parquet row per input image; bad images become error rows, never crashes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print this tool's version and those it runs on (for bug reports)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="predict every image under --input into Parquet at --output",
                       description="Predict every image under --input; write one Parquet row per image. "
                       "Exit 0 when the run completed, even if some images are error rows.")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="write sample digits, run the pipeline on them, print accuracy")
    p.add_argument("--dir", help="working directory (default: a new temporary one)")
    p.add_argument("--count", type=int, default=200, help="sample images (default: 200)")
    p.add_argument("--actors", type=int, help="inference actors (default: one per node)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's own log lines")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train the digits CNN (first 1,500 sklearn digits)")
    p.add_argument("--output", required=True, metavar="PATH", help="checkpoint directory to write")
    p.add_argument("--epochs", type=int, default=16,
                   help="passes over the rendered training set (default: 16, ~1-2 min on 2 cores)")
    p.add_argument("--copies", type=int, default=16,
                   help="renderings of each training digit (default: 16; 1 makes a quick smoke "
                   "run on 1,500 images)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="seed table, model cost, end to end vs a plain loop and Ray's "
                       "recipe, and the machine's limit",
                       description="Measure, in one run, on the same model and images: the seed's "
                       "per-image op-by-op path vs batched compiled execution (bundled CNN); the "
                       "model alone (per device batch with --sweep; bfloat16 vs float32); the "
                       "model stage bare vs inside a Ray actor; decode cost per core, and from "
                       "both the most images/s this machine can do; then images/s of a plain "
                       "Python loop, Ray Data's documented recipe and this pipeline, with the "
                       "pipeline's fraction of that limit. Where JAX sees a GPU every part runs "
                       "on it. Ray start-up (ray.init, and Ray Data's per-cluster actors that a "
                       "cluster's first job starts) is timed apart.")
    p.add_argument("--model-fn", metavar="MODULE:FUNCTION",
                   help="model factory (default: the bundled digits CNN; "
                   "pipeline.bench.photo_cnn:build is a 160x160 RGB CNN with random weights)")
    p.add_argument("--model", metavar="PATH", help="checkpoint for the model factory")
    p.add_argument("--workload", choices=("digits", "photos"), default="digits",
                   help="digits: 128x96 digit JPEGs (cheap to decode); photos: photo-like JPEGs, "
                   "~30 KB at 480x360 (default: digits)")
    p.add_argument("--image-size", type=_image_size, metavar="WxH",
                   help="size of the workload's JPEGs (default: 128x96 digits, 480x360 photos)")
    p.add_argument("--images", type=int, default=20_000, help="JPEG images for end to end (default: 20000)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per contestant (default: 3)")
    p.add_argument("--seed-images", type=int, default=256,
                   help="images for the seed table (default: 256; 0 skips it)")
    p.add_argument("--work", help="directory for images and outputs (reused between runs; default: temp)")
    p.add_argument("--no-end-to-end", action="store_true",
                   help="skip the end-to-end comparison (the rest only)")
    p.add_argument("--model-images", type=int, default=16384,
                   help="decoded images for the model's cost and the model stage, bare model vs "
                   "in a Ray actor (default: 16384; 0 skips the model stage)")
    p.add_argument("--sweep", type=_batch_sizes, default=(), metavar="B1,B2,...",
                   help="also measure the model per device batch, e.g. 32,64,128,256,512 "
                   "(multiples of 32)")
    p.add_argument("--no-bf16", action="store_true", help="skip bfloat16 vs float32")
    p.add_argument("--memory-factor", type=int, default=0, metavar="N",
                   help="also run the pipeline on N times --images and compare peak memory "
                   "(e.g. 10; default: off, it writes N x --images files)")
    p.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gpu-check", help="check a GPU node end to end: devices, GPU tests, "
                       "seed table, model stage, bf16, device-batch sweep, a pipeline run",
                       description="Check this node in one command: the devices JAX sees, "
                       "'pytest -m gpu', the seed table, the Predictor vs the bare model, "
                       "bfloat16 vs float32, a device-batch sweep and a pipeline run on photo-like "
                       "JPEGs against the bare model and the machine's limit. Prints a report and "
                       "writes it as JSON with --json. Without a GPU it runs the same on the CPU, "
                       "labelled 'no GPU'. Exit 1 when a check failed.")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (a minute on a laptop CPU): checks that it all works")
    p.add_argument("--photos", type=int, metavar="N",
                   help="photos for the pipeline run (default: 4000; 64 with --quick)")
    p.add_argument("--model-fn", metavar="MODULE:FUNCTION",
                   help="model factory (default: the bundled digits CNN)")
    p.add_argument("--model", metavar="PATH", help="checkpoint for the model factory")
    p.add_argument("--work", help="directory for images and outputs (default: temp)")
    p.add_argument("--skip-tests", action="store_true",
                   help="leave out 'pytest -m gpu' (they test the node, not the model: when "
                   "checking a second model on a node already checked)")
    p.set_defaults(func=cmd_gpu_check)

    p = sub.add_parser("report", help="print the run report of an output directory",
                       description="Print what a finished run did, from OUT/_summary.json: key "
                       "numbers, throughput over time, time per image by stage, plan, actors and "
                       "nodes, errors by kind with example paths. --html writes the same as one "
                       "self-contained page. Exit 2 when OUT holds no summary.")
    p.add_argument("output", metavar="OUT", help="the run's --output directory (or s3:// URI)")
    p.add_argument("--html", metavar="PATH", help="also write the report page to PATH")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample-data", help="write held-out digit images as DIR/<label>/<name>.<ext>")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--count", type=int, default=100, help="images to write (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = argv is None  # the batch-infer command, not a call from Python
    if command and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)
    try:
        return _dispatch(args)
    finally:
        if command:
            _stop_ray()


def _interrupted(signum, frame) -> None:
    """The first Ctrl-C stops the command; later ones are ignored: stopping Ray Data and Ray
    takes a few seconds, and a second Ctrl-C (people press it twice) would only cut that short
    and print the traceback of whatever it landed in."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _stop_ray() -> None:
    """Stop the Ray this command started (or leave the cluster it joined) now, with Ctrl-C
    ignored, rather than in Ray's exit handler, where a Ctrl-C prints Ray's traceback."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ray.shutdown()


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"batch-infer: error: {e}", file=sys.stderr)
        return 2
    except RUN_ERRORS as e:  # the run started and could not finish
        print(f"batch-infer: run failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of every thread it cut
        rest = (": rows already written are kept; run again with --resume to finish"
                if args.command == "run" else "")
        print(f"\nbatch-infer: interrupted{rest}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
