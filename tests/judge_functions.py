"""Function judges for tests (`judge.function = "tests.judge_functions:<name>"`)."""


def shorter(prompt, completion: str) -> float:
    """Shorter completions win: a judge that tiny random models give distinct scores almost always."""
    return -float(len(completion))
