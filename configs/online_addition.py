"""On-policy DPO that teaches arithmetic: SmolLM2-135M-Instruct learns to answer two-digit additions right.

Each round the policy answers prompts of assets/online_addition/prompts.jsonl ("What is 37 + 45?", "Add 37
and 45.", "What's the sum of 37 and 45?", ... written by tools/make_addition_prompts.py) k times at a
temperature; the rule judge jaxdpo.judging.rules:correct_sum reads the sum the prompt asks for and the
number the answer gives (1.0 when right, plus a tenth for brevity), each prompt's k judged answers train
LoRA DPO as one group (every pair of different scores), and the next round samples the trained policy.
After each round, the held-out prompts of assets/online_addition/eval_prompts.jsonl (no pair of numbers
in common with the train prompts) are answered greedily: eval/greedy_correct in WORKDIR/metrics.jsonl is
the share answered right (the judge's score >= judge.correct_score), beside the sampled eval/win_rate
against the initial model.

    python tools/get_model.py smollm2 ckpt/smollm2-135m-instruct   # once (see README)
    python -m jaxdpo.train --config=configs/online_addition.py
"""

from configs import smollm2


def get_config():
    # The model, LoRA (r=16 on every projection), beta and layout family of the offline SmolLM2 run.
    c = smollm2.get_config()
    c.workdir = "runs/online_addition"
    c.data.train_files = "assets/online_addition/prompts.jsonl"  # online rounds train on WORKDIR/rounds/N.jsonl
    c.data.eval_files = ""
    # Prompts are ~40 tokens with SmolLM2's default system prompt; answers are cut at 48 new tokens.
    c.data.max_prompt_length = 48
    c.data.max_length = 96
    c.data.layout = "grouped"  # a group's prompt once, its k answers as branches after it
    c.loss.group = "all_pairs"  # every pair of a group's answers with different scores: right over wrong first
    # RPO: the NLL of each pair's chosen answer (here the right ones) beside DPO's margin; DPO alone pushes the
    # wrong answers down more than the right ones up, and a few pairs per round drift the policy's wording.
    c.loss.nll_coef = 1.0
    c.reference.mode = "device"  # with LoRA: the round's base model with the adapters off (no copy)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 0  # a round is a few steps: every one at the full rate
    c.optim.min_lr_ratio = 1.0
    c.train.batch_size = 8  # groups per step
    c.train.micro_batch_size = 8
    c.train.steps = 0
    c.train.epochs = 2.0  # per round, over its groups
    c.train.log_every = 1
    c.train.save_every = 8
    # Held-out evaluation: greedy answers of 48 new tokens judged right at a score >= 1.0 (correct_sum's
    # right answers score 1.0 + 0.1 * brevity, wrong ones at most 0.1); the win rate samples 48 tokens too.
    c.sampling.max_new_tokens = 48
    c.sampling.temperature = 0.7
    c.sampling.batch_size = 64
    c.judge.function = "jaxdpo.judging.rules:correct_sum"
    c.judge.correct_score = 1.0
    c.judge.prompts = 64
    # Three rounds: greedy accuracy 0.05 -> 0.20 -> 0.34 -> 0.64 in 18 min on the shared 2-core CPU (README);
    # each round costs ~5 min there, most of it sampling.
    c.online.rounds = 3
    c.online.prompts = "assets/online_addition/prompts.jsonl"
    c.online.eval_prompts = "assets/online_addition/eval_prompts.jsonl"
    c.online.prompts_per_round = 32
    # The base model answers ~4% of samples right: 8 answers per prompt find a right one for a third of the
    # prompts; a prompt whose answers all tie (all wrong, all brief) trains nothing.
    c.online.samples_per_prompt = 8
    c.online.max_new_tokens = 48  # as the greedy eval: what is not answered in 48 tokens is not answered
    c.online.temperature = 1.0  # the model's own distribution: its rare right answers are what a round learns from
    c.online.pairs = "group"
    c.online.reference = "previous"
    return c
