"""The reasoning teacher: one request per problem, answer as `<think>…</think><answer>…</answer>`.

A server that returns the chain of thought separately (`reasoning_content`, as
DeepSeek's API and vLLM's reasoning parsers do) is normalised into the same tags.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.models.client import ChatResponse, ModelClient
from flows.models.confidence import confidence_fields
from flows.inputs.prompts import PromptFile
from schemas.records import Problem, Trajectory


@dataclass
class ReasoningTeacher:
    client: ModelClient
    prompt: PromptFile
    params: dict  # sampling parameters sent with every request
    role: str = "reasoning"

    def first_request_journaled(self, problem: Problem, sample: int = 0) -> bool:
        """Whether `solve` would replay its (only) request from the journal."""
        return self.client.journaled(self.prompt.chat(problem=problem.problem), self.params, sample=sample)

    async def solve(self, problem: Problem, shard: str, sample: int = 0) -> Trajectory:
        messages = self.prompt.chat(problem=problem.problem)
        response = await self.client.chat(messages, self.params, sample=sample, shard=shard)
        return Trajectory(
            problem_id=problem.id,
            teacher="reasoning",
            model=self.client.model,
            text=normalise_reasoning(response),
            finish_reason=response.finish_reason,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            requests=1,
            replayed_requests=int(response.replayed),
            latency_s=0.0 if response.replayed else response.latency_s,
            sample=sample,
            **confidence_fields(response.confidence),
        )


def normalise_reasoning(response: ChatResponse) -> str:
    content = response.content.strip()
    reasoning = (response.reasoning_content or "").strip()
    if reasoning and "<think>" not in content:
        return f"<think>\n{reasoning}\n</think>\n{content}"
    return content
