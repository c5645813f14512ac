"""Entry point: python -m jaxdpo.train --config=configs/dpo.py [--config.key=value ...]"""

import sys

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
