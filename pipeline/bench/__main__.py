"""The bench's child processes (the command is ``batch-infer bench``):

    python -m pipeline.bench --contestant NAME IMAGES OUTPUT SETUP_JSON   # one contestant
    python -m pipeline.bench --call MODULE:FUNCTION KWARGS_JSON           # a GPU measurement
"""

import json
import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["--contestant"] and len(sys.argv) == 6:
        from pipeline.bench.contestants import contestant
        from pipeline.bench.workload import Setup

        _, _, name, images, output, setup = sys.argv
        print(json.dumps(contestant(name, images, output, Setup.from_json(setup))))
    elif sys.argv[1:2] == ["--call"] and len(sys.argv) == 4:
        from pipeline.bench.gpu import call_here

        call_here(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__ + "\nuse: batch-infer bench --help")
