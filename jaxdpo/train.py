"""Entry point: python -m jaxdpo.train --config=configs/dpo.py [--config.key=value ...]"""

import os
import sys

# Simulated CPU devices (--xla_force_host_platform_device_count) deadlock in all-reduce when XLA's
# concurrency-optimized CPU scheduler orders collectives differently per device; turn it off there.
if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") and \
        "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dpo.py", "Path to a configs/*.py file.")


def main(argv):
    del argv
    from jaxdpo import config as config_lib
    config = _CONFIG.value
    try:
        config_lib.validate(config)
        from jaxdpo import distributed
        distributed.initialize(config.distributed)
        from jaxdpo.trainer import Trainer
        Trainer(config).run()
    except config_lib.ConfigError as e:
        print(f"jaxdpo: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
