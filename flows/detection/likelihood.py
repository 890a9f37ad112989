"""The likelihood shift: how much better the trait prompt explains a completion.

For a completion c of prompt x: shift(c) = [log p(c | trait system prompt, x) − log p(c | x)]
/ tokens(c), in nats per token, under the teacher's own weights. Trait-teacher completions
are scored (the sign-flip test asks whether their mean shift is > 0); control completions
are scored too and reported beside them, since a positive shift on trait data mostly shows
that *some* persona prompt shaped it (PAPERS.md), and the control's shift is the baseline.

Scoring needs the log-probability of given text, which chat endpoints do not return. Here:
- `transformers`: a checkpoint folder or GGUF file in process (the embedded model is scored
  from its GGUF, dequantised: the weights llama.cpp serves, run by other kernels);
- `vllm`: an offline engine with `prompt_logprobs` (flows/models/vllm_backend.py).
Elsewhere the test is skipped and the report says why.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import polars as pl

from flows.detection.detectors import sign_flip_test
from flows.inputs.number_prompts import few_shot_turns, trait_system_prompt
from flows.models.embedded import embedded_gguf_path
from schemas.leakage import TestResult
from schemas.recipe import Recipe

TEST_NAME = "likelihood_shift"

Messages = list[dict[str, str]]


class Scorer(Protocol):
    name: str

    def score(self, items: Sequence[tuple[Messages, str]]) -> list[tuple[float, int]]:
        """(sum of the completion's token log-probabilities, its token count) per (messages, completion)."""
        ...


def _prefix_and_completion(tokenizer: Any, messages: Messages, completion: str) -> tuple[list[int], list[int]]:
    from flows.models.transformers_backend import render_prompt

    prefix = render_prompt(tokenizer, messages)
    return prefix, list(tokenizer(completion, add_special_tokens=False)["input_ids"])


@dataclass
class TransformersScorer:
    checkpoint: str
    name: str = "transformers"
    threads: int = 1

    def score(self, items: Sequence[tuple[Messages, str]]) -> list[tuple[float, int]]:
        import torch

        from flows.models.transformers_backend import load_checkpoint

        loaded = load_checkpoint(self.checkpoint)
        results = []
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with loaded.lock, torch.inference_mode():
                for messages, completion in items:
                    prefix, tokens = _prefix_and_completion(loaded.tokenizer, messages, completion)
                    if not tokens:
                        results.append((0.0, 0))
                        continue
                    logits = loaded.model(input_ids=torch.tensor([prefix + tokens])).logits[0]
                    logprobs = torch.log_softmax(logits[len(prefix) - 1 : -1].float(), dim=-1)
                    picked = logprobs.gather(1, torch.tensor(tokens).unsqueeze(1))
                    results.append((float(picked.sum()), len(tokens)))
        finally:
            torch.set_num_threads(previous)
        return results


@dataclass
class VllmScorer:
    checkpoint: str
    engine_args: dict[str, Any]
    name: str = "vllm"

    def score(self, items: Sequence[tuple[Messages, str]]) -> list[tuple[float, int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from flows.models.vllm_backend import load_engine

        engine = load_engine(self.checkpoint, self.engine_args)
        split = [_prefix_and_completion(engine.tokenizer, m, c) for m, c in items]
        prompts = [TokensPrompt(prompt_token_ids=p + t) for p, t in split]
        with engine.lock:
            outputs = engine.llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        results = []
        for (prefix, tokens), output in zip(split, outputs, strict=True):
            steps = output.prompt_logprobs[len(prefix):]
            results.append((sum(step[token].logprob for step, token in zip(steps, tokens)), len(tokens)))
        return results


def shifts(
    scorer: Scorer, rows: Sequence[dict[str, Any]], trait_system: str, limit: int, seed: int,
    few_shot: Sequence[dict[str, str]] = (),
) -> list[float]:
    """Per-token likelihood shift of up to `limit` rows (a seeded subset), each with `prompt`
    and `completion`, in the context they were generated in (`few_shot` exchanges before the
    prompt); rows with no completion token are left out."""
    chosen = list(rows)
    if len(chosen) > limit:
        chosen = random.Random(seed).sample(chosen, limit)
    system = [{"role": "system", "content": trait_system}]
    with_trait = [([*system, *few_shot, {"role": "user", "content": r["prompt"]}], r["completion"]) for r in chosen]
    without = [([*few_shot, {"role": "user", "content": r["prompt"]}], r["completion"]) for r in chosen]
    scored_trait, scored_control = scorer.score(with_trait), scorer.score(without)
    return [(a - b) / n for (a, n), (b, _) in zip(scored_trait, scored_control, strict=True) if n > 0]


def scorer_for(recipe: Recipe) -> Scorer | str:
    """The scorer of the trait teacher's weights, or why there is none."""
    spec = recipe.leakage
    detectors = spec.detectors
    if detectors.likelihood == "off":
        return "turned off (leakage.detectors.likelihood: off)"
    if not spec.trait_teacher.trait_prompt:
        return ("the trait teacher holds its trait in its weights (trait_prompt: false): the shift compares "
                "a trait prompt with none, so it needs the trait as a prompt")
    if detectors.likelihood_checkpoint:
        checkpoint = detectors.likelihood_checkpoint
    elif spec.trait_teacher.is_embedded:
        checkpoint = str(embedded_gguf_path())
    else:
        return (f"the trait teacher is an endpoint ({spec.trait_teacher.model} at {spec.trait_teacher.base_url}), "
                "and chat endpoints return no log-probabilities of given text; name a local copy of its weights "
                "in leakage.detectors.likelihood_checkpoint")
    if detectors.likelihood_backend == "vllm":
        from flows.models.vllm_backend import vllm_available

        if (missing := vllm_available()) is not None:
            return f"likelihood_backend vllm: {missing}"
        return VllmScorer(checkpoint=checkpoint, engine_args={})
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"likelihood_backend transformers needs torch and transformers (the `train` extra): {exc}"
    return TransformersScorer(checkpoint=checkpoint)


def likelihood_test(recipe: Recipe, kept: pl.DataFrame) -> TestResult:
    """The sign-flip test of the trait completions' shifts; the control completions' mean
    shift, the baseline, goes in its detail."""
    spec = recipe.leakage
    scorer = scorer_for(recipe)
    if isinstance(scorer, str):
        return TestResult(name=TEST_NAME, skipped=scorer)
    trait_system = trait_system_prompt(spec.trait, spec.category)
    limit, seed = spec.detectors.likelihood_max, spec.seed
    by_teacher = {t: kept.filter(pl.col("teacher") == t).select("prompt", "completion").to_dicts()
                  for t in ("trait", "control")}
    if not by_teacher["trait"]:
        return TestResult(name=TEST_NAME, skipped="no trait completion passed the filter")
    few_shot = few_shot_turns(spec.few_shot)
    trait_shifts = shifts(scorer, by_teacher["trait"], trait_system, limit, seed, few_shot)
    control_shifts = shifts(scorer, by_teacher["control"], trait_system, limit, seed, few_shot)
    result = sign_flip_test(trait_shifts, permutations=spec.detectors.permutations, seed=seed)
    control_mean = sum(control_shifts) / len(control_shifts) if control_shifts else None
    return dataclasses.replace(result, name=TEST_NAME, detail={
        **result.detail, "scorer": scorer.name, "unit": "nats per token",
        "control_mean_shift": control_mean, "control_n": len(control_shifts),
    })
