"""Ray job entrypoint: ``recmem train`` inside a Ray job (the driver connects to the job's cluster).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/quickstart.yaml ray.num_workers=2

Arguments are those of ``recmem train``: ``--config FILE`` and ``key=value`` overrides.
"""

import sys

from recmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
