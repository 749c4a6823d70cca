"""Ray Job entrypoint: the same options as ``batch-infer run``.

    ray job submit --working-dir . -- python jobs/batch_infer.py --input SRC --output DIR
"""

import argparse
import sys

from pipeline.cli import USER_ERRORS, add_run_arguments, config_from_args, print_summary
from pipeline.runner import run_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    try:
        print_summary(run_config(config_from_args(parser.parse_args())))
    except USER_ERRORS as e:
        print(f"batch_infer job: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
