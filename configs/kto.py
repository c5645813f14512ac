"""KTO (Ethayarajh et al., TRL 1.16's KTOTrainer) on the bundled demo: thumbs-up / thumbs-down rows.

The demo's pair file feeds it as unpaired rows (each pair: its chosen completion desirable, its rejected one
undesirable, in TRL's unpair_preference_dataset order); a file of {"prompt", "completion", "label"} rows
feeds it directly. Eval reports rewards/accuracies over the eval pairs the rows came from.

    python -m jaxdpo.train --config=configs/kto.py --config.workdir=/tmp/kto
"""

from configs import dpo


def get_config():
    c = dpo.get_config()
    c.workdir = "runs/kto"
    c.loss.types = ("kto",)
    c.loss.beta = 0.1
    c.loss.desirable_weight = 1.0  # the demo gives as many desirable rows as undesirable ones
    c.loss.undesirable_weight = 1.0
    c.train.batch_size = 32  # rows per step: 16 pairs' worth, one KL chunk
    c.train.micro_batch_size = 32
    return c
