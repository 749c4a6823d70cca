"""Ray Job entrypoint: the same options as ``batch-infer run``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/batch_infer.py --input SRC --output DIR

Run from the repository root (the job's working directory): the package does not need to be
installed on the cluster, Ray ships the working directory to every node.
"""

import argparse
import os
import sys

# `python jobs/batch_infer.py` puts jobs/ first on sys.path, not the working directory that
# holds `pipeline/`; Ray workers get the working directory on their path from the runtime env.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipeline  # noqa: E402
from pipeline import console  # noqa: E402
from pipeline.cli import RUN_ERRORS, USER_ERRORS, add_run_arguments, config_from_args  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args = parser.parse_args()
    print(f"batch_infer job: pipeline package at {os.path.dirname(pipeline.__file__)}", flush=True)
    try:
        console.run(config_from_args(args), verbose=getattr(args, "verbose", False))
    except USER_ERRORS as e:
        print(f"batch_infer job: error: {e}", file=sys.stderr)
        return 2
    except RUN_ERRORS as e:
        print(f"batch_infer job: run failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
