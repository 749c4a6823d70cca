"""The README's shell commands, run as a newcomer would: the README cannot drift again.

Every command in a ```bash block of README.md is either executed here or listed in
:data:`SKIPPED` with the reason it cannot run on one machine without credentials (or the
test elsewhere that runs it). A new
command is executed by default, so it is tested (and fails here until it runs on tiny inputs)
unless someone adds it to :data:`SKIPPED`; an entry of :data:`SKIPPED` that matches no
command fails too, so the table cannot outlive what it excuses.

How a command is executed, block by block in README order, each block in a sandbox of its own:

- the working directory is ``SANDBOX/cwd``, holding the inputs the README assumes you have
  (``path/to/images``, ``images``, ``data/`` with Parquet files of image bytes); ``/tmp/...``
  paths are moved under ``SANDBOX/tmp``; ``HOME`` and ``TMPDIR`` point into the sandbox;
- ``batch-infer`` is ``python -m pipeline.cli`` and ``python`` this interpreter, with this
  checkout first on ``PYTHONPATH`` (checked below), each command with a local Ray of its own in
  a private ``RAY_TMPDIR`` (as a user's first run starts one), stopped after it;
- sizes shrink to tiny ones (:data:`TINY`: ``--images 20000`` becomes 16, one epoch...);
  nothing else about the command changes;
- ``duckdb -c SQL`` runs SQL through the duckdb Python module when the duckdb CLI is absent
  (the test extra installs the module, not the CLI): the query itself is the README's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from driver import private_ray_env, stop_private_ray

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Commands not run here, by their first words (or an argument, for s3://), and why.
SKIPPED: dict[tuple[str, ...], str] = {
    ("pip", "install"): "changes this environment and needs the network; the tests run the "
                        "package as installed",
    ("python", "-m", "pytest"): "the test suite itself",
    ("export", "RAY_AUTH_MODE=token"): "part of the Ray Job recipe on a running head (cluster; "
                                       "tests/test_job_submit.py runs it on loopback)",
    ("ray", "get-auth-token"): "writes ~/.ray/auth_token for a cluster's head (cluster)",
    ("ray", "start"): "starts a long-lived Ray head (cluster; tests/test_job_submit.py)",
    ("ray", "job"): "needs a running Ray head with its job server (cluster; "
                    "tests/test_job_submit.py submits the same entrypoint on loopback)",
    ("RAY_AUTH_MODE=token", "ray", "job"): "submits to the AWS cluster of cluster.yaml (cluster, "
                                           "cloud credentials)",
    ("ray", "stop"): "stops the head of the Ray Job recipe (cluster)",
    ("ray", "up"): "launches AWS instances (cloud credentials; tests/test_cluster_config.py "
                   "validates cluster.yaml)",
    ("ray", "dashboard"): "tunnels to the AWS cluster's head (cloud credentials)",
    ("ray", "down"): "stops the AWS cluster (cloud credentials)",
    ("python", "-c", "import torchvision; from safetensors.torch import save_file; save_file("
     "torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), "
     "'resnet50.safetensors')"): "needs torch, torchvision and the weights from the network "
                                "(tests/test_resnet.py loads seeded weights in the same layout)",
    ("huggingface-cli", "download"): "downloads CLIP's weights from the Hugging Face hub "
                                     "(network; tests/test_clip.py loads seeded weights in the "
                                     "same layout)",
    ("batch-infer", "gpu-check"): "runs in tests/test_gpu_check.py, through "
                                  "tools/gpu_check_node.sh, which calls it (with --quick; "
                                  "its report checked there)",
    ("batch-infer", "bench", "--workload", "photos"): (
        "the bench above on the photos workload (~40 s more here): tests/test_bench.py runs "
        "its contestants on photos with an RGB model, and its flags are parsed below"),
    ("docker",): "needs docker and a container registry",
    ("kubectl",): "needs a Kubernetes cluster with KubeRay (tests/test_cluster_config.py "
                  "checks k8s/rayjob.yaml's entrypoint)",
    ("export", "AWS_REGION=us-west-2"): "AWS settings (cloud credentials)",
    ("export", "AWS_ACCESS_KEY_ID=..."): "AWS keys (cloud credentials)",
    ("export", "AWS_ENDPOINT_URL=http://127.0.0.1:9000"): "an S3-compatible server the reader "
                                                          "runs (cloud credentials)",
    ("s3://",): "reads or writes a real bucket (cloud credentials; tests/test_s3.py runs the "
                "pipeline against moto's S3 server)",
}

# Sizes for a smoke run: (program words) -> {option: value}. The option is set to this value,
# or kept when the README's value is smaller; added when the README leaves it at its default.
TINY: dict[tuple[str, ...], dict[str, int]] = {
    ("batch-infer", "demo"): {"--count": 16},
    ("batch-infer", "train"): {"--epochs": 1, "--copies": 1},
    ("batch-infer", "bench"): {"--images": 16, "--repeats": 1, "--seed-images": 8,
                               "--model-images": 64},
    ("python", "-m", "examples.color_classifier.train"): {"--steps": 40, "--train-images": 384,
                                                           "--count": 12},
}

# Flags added for a smoke run: (program words) -> flags (none at present).
FLAGS: dict[tuple[str, ...], list[str]] = {
}

# What a command's output must show beyond exit status 0: (program words) -> pattern.
EXPECT: dict[tuple[str, ...], str] = {
    ("batch-infer", "demo"): r"accuracy on the sample digits: \d+/16 ",
    ("batch-infer", "run"): r"rows: [1-9]\d* \([1-9]\d* ok, 0 error",
    ("batch-infer", "train"): r'"heldout_accuracy"',
    ("batch-infer", "bench"): r"Seed table",
    ("python", "-c"): r"path",
    ("duckdb",): r"\d",
    ("python", "-m", "examples.color_classifier.train"): r"wrote 12 sample images",
    ("batch-infer", "report"): r"rows ok",
}


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    line: int  # where it starts in README.md

    def __str__(self) -> str:
        return f"README.md:{self.line}: {shlex.join(self.argv)}"

    def starts_with(self, words: tuple[str, ...]) -> bool:
        return self.argv[: len(words)] == words


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of each ```bash block, indented ones included."""
    blocks, current, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None and stripped == "```bash":
            current, start = [], n + 1
        elif current is not None and stripped == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"README.md: the ```bash block at line {start} never closes"
    return blocks


def commands(start: int, source: str) -> list[Command]:
    """The block's commands: continuation lines and multi-line quotes joined, comments dropped,
    and ``a && b`` / ``a; b`` / ``a | b`` / ``a &`` cut into their parts."""
    found, pending, first = [], "", start
    for n, line in enumerate(source.splitlines(), start):
        if not pending:
            first = n
        pending += line.strip() + "\n"
        if pending.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:  # a quote that closes on a later line
            continue
        pending, words = "", []
        for token in [*tokens, ";"]:
            if token in ("&&", ";", "|", "&", "||"):
                if words:
                    found.append(Command(tuple(words), first))
                words = []
            else:
                words.append(token)
    assert not pending, f"README.md:{first}: unterminated command {pending!r}"
    return found


def readme_commands() -> list[list[Command]]:
    return [commands(start, source) for start, source in bash_blocks(README.read_text())]


def skip_entry(cmd: Command) -> tuple[str, ...] | None:
    """The first key of SKIPPED that excuses ``cmd``, if any."""
    for words in SKIPPED:
        if words == ("s3://",):
            if any(arg.startswith("s3://") for arg in cmd.argv):
                return words
        elif cmd.starts_with(words):
            return words
    return None


def skip_reason(cmd: Command) -> str | None:
    entry = skip_entry(cmd)
    return SKIPPED[entry] if entry else None


def program(cmd: Command, table: dict[tuple[str, ...], object]) -> tuple[str, ...] | None:
    """The longest key of ``table`` that ``cmd`` starts with."""
    keys = [words for words in table if cmd.starts_with(words)]
    return max(keys, key=len) if keys else None


BLOCKS = readme_commands()
RUN_BLOCKS = [
    block for block in BLOCKS if any(skip_reason(c) is None for c in block)
]


def block_id(block: list[Command]) -> str:
    first = next(c for c in block if skip_reason(c) is None)
    words = [w for w in first.argv[:3] if not w.startswith("-")]
    return f"line{block[0].line}-" + "-".join(Path(w).name for w in words[:2])


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    """Rules out: a README command that no test runs (a new one runs by default below, so it
    can only go untested through SKIPPED), and a SKIPPED entry that excuses nothing."""
    every = [c for block in BLOCKS for c in block]
    assert len(every) >= 30, f"the parser found only {len(every)} commands in README.md"
    unused = set(SKIPPED) - {skip_entry(c) for c in every}
    assert not unused, f"SKIPPED entries that match no README command: {sorted(unused)}"
    executed = [c for c in every if skip_reason(c) is None]
    for needed in [("batch-infer", "demo"), ("batch-infer", "run"), ("batch-infer", "train"),
                   ("batch-infer", "bench"), ("python", "-c"), ("duckdb", "-c"),
                   ("python", "-m", "examples.color_classifier.train")]:
        assert any(c.starts_with(needed) for c in executed), (
            f"no README command starting with {' '.join(needed)} is executed: is it still in "
            "README.md, and not excused by SKIPPED?")
    assert any("--model-fn" in c.argv for c in executed), "the example model is never run"


def test_skipped_batch_infer_commands_still_parse():
    """A skipped ``batch-infer`` command is not run, but a renamed or removed flag in it must
    still fail here: each parses with the CLI's own parser."""
    from pipeline.cli import build_parser

    skipped = [c for block in BLOCKS for c in block
               if c.argv[0] == "batch-infer" and skip_reason(c) is not None]
    assert len(skipped) >= 3, "the skipped batch-infer commands (s3://, gpu-check, bench)"
    for cmd in skipped:
        try:
            build_parser().parse_args(list(cmd.argv[1:]))
        except SystemExit:
            pytest.fail(f"README.md line {cmd.line}: {cmd} does not parse (see stderr)")


def test_the_readme_commands_run_this_checkout(tmp_path):
    """Rules out testing the wrong code: ``python -m pipeline.cli`` and ``examples`` must
    resolve to this checkout (a worktree beside an editable install of another)."""
    code = "import pipeline.cli, examples.color_classifier.color_model as m; " \
           "print(pipeline.cli.__file__); print(m.__file__)"
    result = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, "/tmp/unused"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(ROOT / "pipeline" / "cli.py"),
                                     str(ROOT / "examples" / "color_classifier" / "color_model.py")]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=block_id)
def test_readme_block_runs(block: list[Command], tmp_path):
    """Rules out README drift: a renamed flag (``--seconds`` for ``--epochs``), a command
    that exits non-zero, output a later command of the block cannot read."""
    cwd = tmp_path / "cwd"
    _prepare_inputs(cwd)
    if any("resnet50.safetensors" in c.argv for c in block):
        _resnet_weights(cwd / "resnet50.safetensors")
    if any("clip-vit-base-patch32/" in c.argv for c in block):
        # A small CLIP in the same layout (transformers' own save_pretrained files): the
        # command is what is tested here; tests/test_clip.py checks ViT-B/32 itself.
        shutil.copytree(ROOT / "tests" / "reference" / "clip_tiny", cwd / "clip-vit-base-patch32")
    for cmd in block:
        reason = skip_reason(cmd)
        if reason is not None:
            print(f"skipped {cmd}: {reason}")
            continue
        argv = _executable(cmd, tmp_path)
        result = _run(argv, cwd, tmp_path)
        where = f"{cmd}\n  ran as: {shlex.join(argv)}\n  exit {result.returncode}"
        assert result.returncode == 0, f"{where}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        expected = program(cmd, EXPECT)
        if expected:
            assert re.search(EXPECT[expected], result.stdout), f"{where}\n{result.stdout[-3000:]}"


def _executable(cmd: Command, sandbox: Path) -> list[str]:
    """The command as this test runs it: tiny sizes, /tmp in the sandbox, this interpreter."""
    argv = [a.replace("/tmp/", f"{sandbox}/tmp/") for a in cmd.argv]
    assert not {">", ">>", "<"} & set(argv), f"{cmd}: redirections are not supported here"
    tiny = program(cmd, TINY)
    for option, value in (TINY[tiny] if tiny else {}).items():
        if option in argv:
            i = argv.index(option) + 1
            argv[i] = str(min(int(argv[i]), value))
        else:
            argv += [option, str(value)]
    flags = program(cmd, FLAGS)
    argv += [f for f in (FLAGS[flags] if flags else []) if f not in argv]
    if argv[0] == "batch-infer":
        return [sys.executable, "-m", "pipeline.cli", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "duckdb" and not shutil.which("duckdb"):
        assert argv[1] == "-c" and len(argv) == 3, f"{cmd}: only 'duckdb -c SQL' is supported"
        return [sys.executable, "-c", "import duckdb, sys; duckdb.sql(sys.argv[1]).show()", argv[2]]
    return argv


def _env(sandbox: Path, ray_tmp: str) -> dict[str, str]:
    home, tmp = sandbox / "home", sandbox / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env = private_ray_env(ray_tmp, {"HOME": str(home), "TMPDIR": str(tmp)})
    path = [str(ROOT), *filter(None, env["PYTHONPATH"].split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))  # this checkout first
    return env


def _run(argv: list[str], cwd: Path, sandbox: Path) -> subprocess.CompletedProcess:
    ray_tmp = tempfile.mkdtemp(prefix="bi-readme-", dir="/tmp")  # short: Ray's socket paths
    try:
        return subprocess.run(argv, cwd=cwd, env=_env(sandbox, ray_tmp), capture_output=True,
                              text=True, timeout=420, start_new_session=True, check=False)
    finally:
        stop_private_ray(ray_tmp)


# The README's my_model.py template, made runnable: its two placeholders get tiny bodies.
TEMPLATE_FILL = {
    "    ...                            # any jittable JAX code\n":
        "    logits = x.mean(axis=(1, 2)) @ params['w']  # (B, 3) @ (3, 2)\n",
    "def apply(params, x):":
        "import numpy as np\n\n\ndef load_my_weights(path):\n"
        "    return {'w': np.load(f'{path}/w.npy')}\n\n\ndef apply(params, x):",
}


def my_model_source() -> str:
    """The README's ``# my_model.py`` block with :data:`TEMPLATE_FILL` applied."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(# my_model\.py\n.*?)```", text, re.DOTALL)
    assert len(blocks) == 1, "README.md: expected one ```python block starting '# my_model.py'"
    source = blocks[0]
    for placeholder, body in TEMPLATE_FILL.items():
        assert placeholder in source, f"README.md's my_model.py no longer has {placeholder!r}"
        source = source.replace(placeholder, body)
    return source


def _prepare_inputs(cwd: Path) -> None:
    """What the README's commands assume the reader has: image directories, Parquet files with
    an image-bytes column ``jpg`` and an id column ``key``, and the README's own model
    factory ``my_model.py`` (filled in) with its weights in ``my_weights/``."""
    import numpy as np

    from pipeline.digits import write_samples

    (cwd / "my_weights").mkdir(parents=True)
    np.save(cwd / "my_weights" / "w.npy", np.ones((3, 2), np.float32))
    (cwd / "my_model.py").write_text(my_model_source())
    files = write_samples(cwd / "path" / "to" / "images", 12, seed=4)
    shutil.copytree(cwd / "path" / "to" / "images", cwd / "images")
    (cwd / "inputs.txt").write_text("".join(f"{f}\n" for f in files[::2]))  # a listing file
    from pipeline.photos import write_photos

    write_photos(cwd / "photos", 3, size=(320, 240), seed=4)
    (cwd / "data").mkdir()
    table = pa.table({"key": [f"k{i:02d}" for i in range(len(files))],
                      "jpg": pa.array([f.read_bytes() for f in files], pa.binary())})
    pq.write_table(table, cwd / "data" / "shard-0.parquet")


def _resnet_weights(path: Path) -> None:
    """A torchvision-layout ResNet-50 checkpoint with the seeded weights of
    tests/reference (what the README's export command would write, without torch)."""
    from reference import resnet_weights

    resnet_weights.write_checkpoint(path)
