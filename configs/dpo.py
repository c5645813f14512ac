"""Default DPO run. With no overrides it trains the bundled demo on a CPU in a few minutes.

    python -m jaxdpo.train --config=configs/dpo.py --config.workdir=/tmp/run1 --config.optim.lr=5e-7
"""

import ml_collections

from jaxdpo.judging import judges
from jaxdpo.preference import loss_specs


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/demo"  # metrics.jsonl, tensorboard, checkpoints/, hf/, data_report.json
    # What trains (jaxdpo/training/objectives.py): preference = the policy under the `loss` section;
    # reward_model = a scorer (decoder + score head) on the same pairs, TRL's RewardTrainer loss (configs/reward_model.py)
    c.objective = "preference"

    c.model = ml_collections.ConfigDict()
    c.model.path = "assets/demo/model"  # a Hugging Face checkpoint directory (config.json + safetensors)
    c.model.tokenizer = ""  # tokenizer directory; empty = model.path
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"  # dtype params and optimizer state are kept in
    c.model.remat = "none"  # none | full | dots_saveable: what the layer scan saves for backward
    c.model.attention = "xla"  # xla | cudnn (GPU) | splash (TPU) | auto: kernels fall back to xla where inexact
    c.model.logprob_chunk = 256  # tokens per chunk of the LM head + logsumexp

    c.data = ml_collections.ConfigDict()
    c.data.train_files = "assets/demo/data/train.jsonl"  # comma-separated files/globs/dirs or hub name
    c.data.eval_files = "assets/demo/data/eval.jsonl"  # empty = hold out data.eval_fraction of train
    c.data.eval_fraction = 0.0
    c.data.prompt_key = "prompt"
    c.data.chosen_key = "chosen"
    c.data.rejected_key = "rejected"
    c.data.completion_key = "completion"  # unpaired rows (kto, apo_zero_unpaired): the completion's column
    c.data.label_key = "label"  # unpaired rows: true = desirable, false = undesirable
    c.data.completions_key = "completions"  # groups (loss.group): the list of N >= 2 completions of the prompt
    c.data.scores_key = "scores"  # groups: one finite number per completion, higher is better, equal ties
    c.data.shuffle = True  # false: batches follow the data's order (KTO's KL rows then match TRL's batches)
    c.data.chat_template = ""  # a template file or literal; empty = the tokenizer's own
    c.data.max_length = 128  # tokens of prompt + completion (per row of the padded layout)
    c.data.max_prompt_length = 96
    c.data.truncation = "keep_end"  # keep_end (cut the prompt from its left) | keep_start
    c.data.layout = "padded"  # padded | prefix_shared | grouped | packed
    c.data.pack_length = 0  # tokens per row of the packed layout; 0 = 2 * max_length
    c.data.on_bad_row = "error"  # error | skip
    c.data.max_samples = 0  # 0 = all
    c.data.cache_dir = ""  # tokenized-data cache; empty = ~/.cache/jaxdpo
    c.data.use_cache = True  # reuse tokenized data from cache_dir when its inputs (files, tokenizer, keys, lengths) are unchanged

    # types, weights, beta, nll_coef and each loss's own keys: defaults and meaning in
    # jaxdpo/preference/loss_specs.py, one Setting per key (see LOSSES.md / README for the family).
    c.loss = ml_collections.ConfigDict(loss_specs.config_defaults())

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 10
    c.optim.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0  # never applied to norms and biases
    c.optim.grad_clip = 1.0  # global-norm clipping; 0 = off

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # pairs per optimizer step (global, all processes)
    c.train.micro_batch_size = 32  # pairs per forward/backward; batch_size/micro_batch_size = accumulation
    c.train.steps = 120  # 0 = derive from train.epochs
    c.train.epochs = 0.0
    c.train.eval_every = 40
    c.train.eval_batch_size = 64
    c.train.log_every = 5
    c.train.save_every = 60
    c.train.keep_checkpoints = 2
    c.train.max_bad_steps = 5  # consecutive non-finite steps before the run stops
    c.train.export_hf = True
    c.train.sample_every = 0  # every N steps: policy vs reference completions -> samples.jsonl, tensorboard; 0 = off
    c.train.sample_prompts = 4  # held-out eval prompts sampled (the first distinct ones)

    # Sampling for train.sample_every and the judge's win rate (policy and reference draw with seeds
    # derived from sampling.seed, see jaxdpo/sampling/samples.py).
    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 64
    c.sampling.temperature = 0.7  # 0 = greedy
    c.sampling.top_k = 0  # 0 = off
    c.sampling.top_p = 1.0  # 1 = off
    c.sampling.seed = 0
    c.sampling.batch_size = 16  # prompts per compiled sampling call

    # A judge ranks completions: eval/win_rate of the policy against the reference at every eval, and
    # the pairs of on-policy rounds. Set one of function ("module:function(prompt, completion) -> float",
    # e.g. "jaxdpo.judging.rules:short_answer") and reward_model (a *ForSequenceClassification checkpoint);
    # both empty = no judge. Each kind declares its keys, defaults and meaning (jaxdpo/judging KINDS).
    c.judge = ml_collections.ConfigDict(judges.config_defaults())

    # On-policy DPO (jaxdpo/online/rounds.py): rounds of sample (k per prompt) -> judge -> best vs worst pairs ->
    # train (train.* per round) on WORKDIR/rounds/N.jsonl. 0 rounds = offline DPO on data.train_files.
    c.online = ml_collections.ConfigDict()
    c.online.rounds = 0
    c.online.prompts = ""  # prompt files, as data.train_files (rows with data.prompt_key; pairs give theirs)
    c.online.eval_prompts = ""  # held-out prompts for the win rate after each round (judge.prompts of them)
    c.online.prompts_per_round = 32
    c.online.samples_per_prompt = 4  # k >= 2 completions per prompt; best vs worst by judge score
    c.online.pairs = "best_worst"  # best_worst | all_pairs (every pair of different scores) | group (needs loss.group)
    c.online.max_new_tokens = 64
    c.online.temperature = 1.0
    c.online.top_k = 0
    c.online.top_p = 1.0
    c.online.reference = "previous"  # previous: each round's starting policy | initial: model.path (no LoRA)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1 = all remaining devices
    c.mesh.tensor = 1
    c.mesh.sequence = 1  # split each row's tokens over this many devices (ring attention); rows: multiples of 2x

    # objective = "reward_model": -logsigmoid(r_chosen - r_rejected - margin) + coefficient * (r_chosen + r_rejected)^2
    c.reward_model = ml_collections.ConfigDict()
    c.reward_model.center_rewards_coefficient = 0.0  # 0 = off; TRL suggests 0.01 (rewards centred on zero)

    c.reference = ml_collections.ConfigDict()
    c.reference.mode = "device"  # device | host | cached | lora_base | none (reference-free losses)
    c.reference.path = ""  # reference checkpoint; empty = the initial policy (model.path)

    # LoRA: train low-rank adapters only; the reference is then the base model with the
    # adapters off (reference.mode device with no path becomes lora_base: same logprobs, no copy).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = off (full fine-tuning)
    c.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.lora.dropout = 0.0  # adapter-input dropout while training, as PEFT (0.05-0.1 common); 0 = off
    c.lora.targets = "all-linear"  # comma-separated q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    # QLoRA: the frozen targeted weights stored as int8 or 4-bit NF4 (blocks of 64, fp32 absmax scales),
    # dequantized layer by layer in the forward; the reference (device / cached) is that same quantized base.
    c.lora.base_dtype = "none"  # none | int8 | nf4
    c.lora.export_merged = False  # also write the merged model to WORKDIR/hf (the adapter goes to hf_adapter/)

    # Experiment trackers besides metrics.jsonl and tensorboard (optional extras: pip install 'jaxdpo[wandb]',
    # 'jaxdpo[mlflow]'). Empty values defer to the library's environment variables (WANDB_*, MLFLOW_*).
    c.logging = ml_collections.ConfigDict()
    c.logging.wandb = ml_collections.ConfigDict()
    c.logging.wandb.enabled = False
    c.logging.wandb.project = ""  # empty = WANDB_PROJECT, else "jaxdpo"
    c.logging.wandb.name = ""  # the run's name; empty = WANDB_NAME, else the workdir's name
    c.logging.wandb.entity = ""  # empty = WANDB_ENTITY, else your default entity
    c.logging.wandb.mode = ""  # online | offline | disabled; empty = WANDB_MODE, else online
    c.logging.mlflow = ml_collections.ConfigDict()
    c.logging.mlflow.enabled = False
    c.logging.mlflow.tracking_uri = ""  # empty = MLFLOW_TRACKING_URI, else MLflow's default
    c.logging.mlflow.experiment = ""  # empty = MLFLOW_EXPERIMENT_NAME, else "jaxdpo"
    c.logging.mlflow.run_name = ""  # empty = the workdir's name

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # empty = auto-detect (TPU pod, SLURM) or single process
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.initialization_timeout = 300
    return c
