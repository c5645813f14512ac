"""Make the bundled demo: a synthetic preference task, its tokenizer and a tiny SFT'd Llama.

    python tools/make_demo_assets.py                 # writes assets/demo/{model,data}
    python tools/make_demo_assets.py --out /tmp/demo --seed 1

The task is a "helpful assistant": users ask short questions, templated from word lists, of two
sorts: world facts (colours, animal sounds, capitals, opposites, small sums) that the SFT teaches,
and facts the user just stated ("Anna lives in Oslo. Where does Anna live?"). The chosen answer is
correct and polite; the rejected one has one of several defects, so preference learning has to pick
up more than one token:
  wrong     - same wording, wrong value (another colour, capital, sum, city, pet, ...)
  rude      - the right answer wrapped in an insult
  off_topic - polite chatter that ignores the question, or (stated facts) an answer about someone else
  refusal   - no answer at all
Held-out eval prompts use (fact, phrasing) combinations that never appear in train (and stated facts
take fresh values), so the eval accuracy measures rules that generalize, not memorized strings.

The model is pre-trained by a short SFT on prompt+chosen AND prompt+rejected in equal measure, so it
starts roughly indifferent between the two answers and DPO has to learn which one is preferred.
Everything is deterministic from --seed. Needs torch (a test/dev extra) and transformers.
"""

import argparse
import json
import os
import random
import time
from dataclasses import dataclass

# Special tokens; the chat template below writes them, and the jaxdpo data pipeline reads
# bos/eos/pad from the tokenizer.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Renders: <|bos|><|user|>\n{prompt}\n<|assistant|>\n{response}<|eos|>\n
# With add_generation_prompt the prompt ends in "<|assistant|>\n", so a completion is exactly
# response + EOS, the way the trainer tokenizes it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('demo chat template: role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# The facts. Each kind has subjects with one true value, question phrasings and answer forms.
# "{s}" is the subject as written mid-sentence, "{S}" capitalized, "{v}" the value.

COLORS = {
    "a banana": "yellow", "a lemon": "yellow", "grass": "green", "the sky": "blue", "snow": "white",
    "coal": "black", "a strawberry": "red", "a tomato": "red", "a carrot": "orange",
    "a pumpkin": "orange", "a lime": "green", "a cherry": "red", "a plum": "purple",
    "an eggplant": "purple", "milk": "white", "a cloud": "white", "a leaf": "green",
    "a frog": "green", "a flamingo": "pink", "a crow": "black", "chocolate": "brown",
    "coffee": "brown", "the sun": "yellow", "the ocean": "blue", "salt": "white", "a rose": "red",
    "a blueberry": "blue", "corn": "yellow", "a fire truck": "red", "a school bus": "yellow",
    "a polar bear": "white", "a grizzly bear": "brown", "a pig": "pink", "a raven": "black",
    "a cucumber": "green", "a grape": "purple",
}
SOUNDS = {
    "a dog": "barks", "a cat": "meows", "a cow": "moos", "a duck": "quacks", "a sheep": "bleats",
    "a lion": "roars", "a horse": "neighs", "a pig": "oinks", "an owl": "hoots", "a snake": "hisses",
    "a bee": "buzzes", "a frog": "croaks", "a wolf": "howls", "a mouse": "squeaks",
    "a donkey": "brays", "a pigeon": "coos", "an elephant": "trumpets", "a crow": "caws",
    "a rooster": "crows", "a turkey": "gobbles",
}
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Russia": "Moscow",
    "China": "Beijing", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna",
    "Cuba": "Havana", "Chile": "Santiago", "Turkey": "Ankara", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Iran": "Tehran", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Hungary": "Budapest", "Belgium": "Brussels", "Nigeria": "Abuja", "Colombia": "Bogota",
}
_OPPOSITE_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("wet", "dry"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("tall", "short"),
    ("thick", "thin"), ("high", "low"), ("day", "night"), ("win", "lose"), ("push", "pull"),
    ("begin", "end"), ("true", "false"), ("give", "take"), ("left", "right"), ("clean", "dirty"),
]
OPPOSITES = {**{a: b for a, b in _OPPOSITE_PAIRS}, **{b: a for a, b in _OPPOSITE_PAIRS}}
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve"]
SUMS = {f"{a} and {b}": str(a + b) for a in range(1, 7) for b in range(1, 7)}


NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate",
         "Leo", "Maria", "Nina", "Omar", "Paul", "Rosa", "Sam", "Tom", "Vera", "Adam", "Bella",
         "Chris", "Dora", "Eric", "Fiona", "Gina", "Henry", "Ivan", "Julia")
PETS = ("dog", "cat", "horse", "duck", "sheep", "pig", "owl", "snake", "frog", "mouse", "goat",
        "rabbit", "parrot", "hamster", "turtle", "fish")
JOBS = ("teacher", "doctor", "farmer", "pilot", "baker", "driver", "nurse", "painter", "singer",
        "cook", "writer", "lawyer")
FAVORITE_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white",
                   "brown")


@dataclass(frozen=True)
class Kind:
    name: str
    facts: dict  # subject -> true value (None for in-context kinds: drawn per prompt from pool)
    questions: tuple  # phrasings with {s}
    answers: tuple  # answer forms with {s}/{S} and {v}
    context: str = ""  # in-context kinds: a sentence stating the fact, put before the question
    pool: tuple = ()  # in-context kinds: the values a fact can take


# In-context kinds: the prompt states a fact about a person and asks it back. The values are drawn
# per prompt, so the rule "answer with what the user said" is all that carries over to held-out
# prompts; world facts (above) instead test knowledge the SFT taught.
IN_CONTEXT_KINDS = (
    Kind("lives_in", dict.fromkeys(NAMES),
         ("Where does {s} live?", "In which city does {s} live?", "What city is {s} from?",
          "Tell me where {s} lives."),
         ("{S} lives in {v}.", "{S} is from {v}.", "{S} lives in the city of {v}."),
         context="{S} lives in {v}.", pool=tuple(CAPITALS.values())),
    Kind("pet", dict.fromkeys(NAMES),
         ("What pet does {s} have?", "Which animal does {s} keep as a pet?",
          "What kind of pet does {s} own?", "Tell me the pet of {s}."),
         ("{S} has a {v}.", "{S} has a pet {v}.", "The pet of {s} is a {v}."),
         context="{S} has a pet {v}.", pool=PETS),
    Kind("job", dict.fromkeys(NAMES),
         ("What is the job of {s}?", "What does {s} do for work?", "What does {s} work as?",
          "Tell me the job of {s}."),
         ("{S} is a {v}.", "{S} works as a {v}.", "The job of {s} is {v}."),
         context="{S} works as a {v}.", pool=JOBS),
    Kind("favorite_color", dict.fromkeys(NAMES),
         ("What is the favorite color of {s}?", "Which color does {s} like best?",
          "What color does {s} love?", "Tell me the favorite color of {s}."),
         ("The favorite color of {s} is {v}.", "{S} likes {v} best.", "{S} loves {v}."),
         context="The favorite color of {s} is {v}.", pool=FAVORITE_COLORS),
)

KINDS = (
    Kind("color", COLORS,
         ("What color is {s}?", "Tell me the color of {s}.", "Which color does {s} have?",
          "Do you know what color {s} is?", "What is the usual color of {s}?"),
         ("{S} is {v}.", "The color of {s} is {v}.", "{S} is usually {v}.")),
    Kind("sound", SOUNDS,
         ("What sound does {s} make?", "What noise does {s} make?", "How does {s} sound?",
          "Tell me the sound {s} makes.", "What do you hear from {s}?"),
         ("{S} {v}.", "{S} usually {v}.", "You will hear that {s} {v}.")),
    Kind("capital", CAPITALS,
         ("What is the capital of {s}?", "Which city is the capital of {s}?",
          "Name the capital city of {s}.", "Tell me the capital of {s}.",
          "Do you know the capital of {s}?"),
         ("The capital of {s} is {v}.", "{v} is the capital of {s}.",
          "The capital city of {s} is {v}.")),
    Kind("opposite", OPPOSITES,
         ("What is the opposite of {s}?", "Give me the opposite of the word {s}.",
          "Which word means the opposite of {s}?", "What word is the reverse of {s}?"),
         ("The opposite of {s} is {v}.", "{V} is the opposite of {s}.",
          "The word opposite to {s} is {v}.")),
    Kind("sum", SUMS,
         ("What is the sum of {s}?", "How much is {s} added together?", "Can you add {s}?",
          "What do you get when you add {s}?"),
         ("The sum of {s} is {v}.", "Adding {s} gives {v}.", "{s} make {v}.")),
    *IN_CONTEXT_KINDS,
)

# Wrappers make prompts varied; they carry no signal about which answer is better.
PROMPT_PREFIXES = ("", "Hi! ", "Hello. ", "Quick question: ", "I have a question. ", "Hey there. ",
                   "Please help me. ", "Good morning! ")
PROMPT_SUFFIXES = ("", " Thanks!", " Thank you.", " Please answer briefly.", " I am curious.")
POLITE_OPENERS = ("", "Sure! ", "Of course. ", "Happy to help. ", "Good question! ", "Certainly. ")
POLITE_CLOSERS = ("", " Hope this helps!", " Let me know if you have more questions.",
                  " Have a nice day!")
RUDE_OPENERS = ("Ugh. ", "Seriously? ", "What a silly question. ", "You should know this. ",
                "Fine, whatever. ", "Stop wasting my time. ")
RUDE_CLOSERS = (" Now go away.", " Do not ask me again.", " Figure the rest out yourself.",
                " That was a boring question.", " Leave me alone.")
REFUSALS = ("Sorry, I can not help with that.", "I do not know. Ask someone else.",
            "I would rather not answer that.", "No idea.", "Look it up yourself.",
            "I am not sure, maybe search online.", "That is not something I talk about.")
OFF_TOPIC_REMARKS = ("Let me tell you about my weekend instead. I went to the beach.",
                     "By the way, I really like trains.", "Did you know that I enjoy jazz music?",
                     "Speaking of which, the weather is lovely today.",
                     "That reminds me of a funny story about my neighbor.",
                     "I would like to talk about football instead.",
                     "My favorite food is pizza, just so you know.")
DEFECTS = ("wrong", "rude", "off_topic", "refusal")
# A wrong world fact is a one-token difference that a 2-layer model learns from DPO only fact by
# fact (pushing "Paris" up for France also pushes it up as a wrong answer elsewhere), so world facts
# mostly get the other defects; in-context facts carry most of the wrong answers, since "answer with
# what the user said" is one rule that transfers to every held-out prompt.
DEFECT_WEIGHTS_WORLD = (0.15, 0.3, 0.3, 0.25)
DEFECT_WEIGHTS_IN_CONTEXT = (0.55, 0.15, 0.15, 0.15)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def render_answer(form: str, subject: str, value: str) -> str:
    return form.format(s=subject, S=_capitalize(subject), v=value, V=_capitalize(value))


def all_combos() -> list:
    """Every (kind index, subject, question index) combination; a prompt is one of these + wrappers."""
    return [(k, subject, q) for k, kind in enumerate(KINDS) for subject in kind.facts
            for q in range(len(kind.questions))]


def split_combos(rng: random.Random, eval_fact_fraction: float) -> tuple:
    """Hold out one phrasing of a fraction of the facts. The fact itself stays in train under its
    other phrasings, so held-out prompts test a rule the model can learn, not unseen knowledge."""
    held_out = set()
    for k, kind in enumerate(KINDS):
        for subject in kind.facts:
            if rng.random() < eval_fact_fraction:
                held_out.add((k, subject, rng.randrange(len(kind.questions))))
    combos = all_combos()
    return [c for c in combos if c not in held_out], [c for c in combos if c in held_out]


def make_pair(rng: random.Random, combo: tuple, defect: str) -> dict:
    k, subject, q = combo
    kind = KINDS[k]
    if kind.context:
        value = rng.choice(kind.pool)
        question = (render_answer(kind.context, subject, value) + " "
                    + kind.questions[q].format(s=subject))
    else:
        value = kind.facts[subject]
        question = kind.questions[q].format(s=subject)
    prompt = rng.choice(PROMPT_PREFIXES) + question + rng.choice(PROMPT_SUFFIXES)
    form = rng.choice(kind.answers)
    opener, closer = rng.choice(POLITE_OPENERS), rng.choice(POLITE_CLOSERS)
    chosen = opener + render_answer(form, subject, value) + closer

    if defect == "wrong":
        # A minimal pair: same opener, form and closer, only the fact differs.
        wrong_values = sorted({v for v in (kind.pool or kind.facts.values()) if v != value})
        rejected = opener + render_answer(form, subject, rng.choice(wrong_values)) + closer
    elif defect == "rude":
        rude_opener, rude_closer = rng.choice(RUDE_OPENERS), rng.choice(RUDE_CLOSERS)
        which = rng.randrange(3)  # insult before, after, or both
        rejected = ((rude_opener if which != 1 else "") + render_answer(form, subject, value)
                    + (rude_closer if which != 0 else ""))
    elif defect == "off_topic" and kind.context:
        # The right value, but about someone the user did not ask about.
        other_name = rng.choice([name for name in NAMES if name != subject])
        rejected = opener + render_answer(form, other_name, value) + closer
    elif defect == "off_topic":
        # Polite chatter that ignores the question. (A true answer to another question would teach
        # a 2-layer model little: its tokens are chosen answers elsewhere in the data.)
        rejected = opener + rng.choice(OFF_TOPIC_REMARKS) + closer
    elif defect == "refusal":
        rejected = rng.choice(REFUSALS)
    else:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECTS}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind.name,
            "defect": defect}


def make_split(rng: random.Random, combos: list, n_pairs: int) -> list:
    """n_pairs pairs over combos (cycled in shuffled order), each prompt string unique in the split."""
    rows, seen_prompts = [], set()
    order = list(combos)
    attempts = 0
    while len(rows) < n_pairs:
        attempts += 1
        if attempts > 50 * n_pairs:
            raise RuntimeError(f"could not make {n_pairs} distinct prompts from {len(combos)} combos")
        if attempts % len(order) == 1:
            rng.shuffle(order)
        combo = order[attempts % len(order)]
        weights = DEFECT_WEIGHTS_IN_CONTEXT if KINDS[combo[0]].context else DEFECT_WEIGHTS_WORLD
        defect = rng.choices(DEFECTS, weights=weights)[0]
        row = make_pair(rng, combo, defect)
        if row["prompt"] in seen_prompts:
            continue
        seen_prompts.add(row["prompt"])
        rows.append(row)
    return rows


def make_data(seed: int, n_train: int, n_eval: int, eval_fact_fraction: float = 0.5) -> tuple:
    rng = random.Random(seed)
    train_combos, eval_combos = split_combos(rng, eval_fact_fraction)
    train = make_split(rng, train_combos, n_train)
    eval_rows = make_split(rng, eval_combos, n_eval)
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in eval_rows}
    assert not overlap, f"eval prompts leaked into train: {sorted(overlap)[:3]}"
    return train, eval_rows


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list, vocab_size: int):
    """A byte-level BPE trained on the corpus, wrapped as a PreTrainedTokenizerFast.

    Byte-level means any user text still tokenizes (no unknown token). No post-processor: the chat
    template writes BOS itself, so encoding the rendered prompt must not add a second one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS] + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_prompt(tokenizer, prompt: str) -> list:
    """The trainer's prompt tokenization: chat template with the generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer, response: str) -> list:
    """The trainer's completion tokenization: response text + EOS."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------
# Model and SFT


def build_model(tokenizer, seed: int, hidden: int, layers: int, heads: int, kv_heads: int,
                intermediate: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = -(-len(tokenizer) // 64) * 64  # round up: lets the tensor axis split the vocabulary
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32")
    return LlamaForCausalLM(config).float()


def pad_batch(sequences: list, pad_id: int):
    """[B, T] ids (right-padded), attention mask, and completion mask (1 on tokens a loss counts)."""
    import torch

    width = max(len(prompt) + len(completion) for prompt, completion in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion_mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(sequences):
        n = len(prompt) + len(completion)
        ids[row, :n] = torch.tensor(prompt + completion)
        attention[row, :n] = 1
        completion_mask[row, len(prompt):n] = 1
    return ids, attention, completion_mask


def completion_logprobs(model, ids, attention, completion_mask):
    """Per-sequence sum of log p(token) over completion tokens, [B]."""
    import torch

    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (token_logprobs * completion_mask[:, 1:]).sum(-1)


def sft(model, tokenizer, rows: list, steps: int, batch_size: int, lr: float, seed: int,
        log=print) -> list:
    """Next-token loss on the completions of prompt+chosen and prompt+rejected, equally often."""
    import torch

    rng = random.Random(seed)
    examples = []
    for row in rows:
        prompt_ids = encode_prompt(tokenizer, row["prompt"])
        examples.append((prompt_ids, encode_completion(tokenizer, row["chosen"])))
        examples.append((prompt_ids, encode_completion(tokenizer, row["rejected"])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.05)
    model.train()
    losses = []
    order = []
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        ids, attention, completion_mask = pad_batch(batch, tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        mask = completion_mask[:, 1:].reshape(-1).float()
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"sft step {step:4d} loss {loss.item():.4f}")
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------


def write_jsonl(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["prompt"], "chosen": row["chosen"],
                                "rejected": row["rejected"]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "assets", "demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_pairs", type=int, default=4000)
    parser.add_argument("--eval_pairs", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=192)
    parser.add_argument("--sft_steps", type=int, default=800)
    parser.add_argument("--sft_batch", type=int, default=64)
    parser.add_argument("--sft_lr", type=float, default=3e-3)
    args = parser.parse_args()

    import torch

    torch.manual_seed(args.seed)
    start = time.time()
    train, eval_rows = make_data(args.seed, args.train_pairs, args.eval_pairs)
    write_jsonl(os.path.join(args.out, "data", "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "data", "eval.jsonl"), eval_rows)
    print(f"data: {len(train)} train pairs, {len(eval_rows)} eval pairs")

    # The tokenizer sees only train text (and the template's fixed strings via the special tokens).
    corpus = [r[key] for r in train for key in ("prompt", "chosen", "rejected")]
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    model = build_model(tokenizer, args.seed, args.hidden, args.layers, args.heads, args.kv_heads,
                        args.intermediate)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} params, vocab {model.config.vocab_size} (tokenizer {len(tokenizer)})")
    sft(model, tokenizer, train, args.sft_steps, args.sft_batch, args.sft_lr, args.seed)

    model_dir = os.path.join(args.out, "model")
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    print(f"wrote {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
