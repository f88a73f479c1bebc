"""The ``cost`` plugin: a job's price before it is submitted, its actual cost after, and budgets.

Price table: ``cost.prices`` over :data:`batchd.config.DEFAULT_PRICES` (standard USD per million
tokens), times ``1 - cost.batch_discount`` (Batch API: half price). A model is priced by its exact
name, else by the longest table name it starts with (``gemini-2.5-flash-preview-09-2025`` costs
what ``gemini-2.5-flash`` costs, ``gemini-2.5-flash-lite-…`` what ``gemini-2.5-flash-lite`` costs).

Estimate (one pass over the job's requests, constant memory):

* input tokens: the characters of every prompt and system instruction, turned into tokens by a
  ratio. With ``cost.count_tokens`` and a provider that counts tokens, the ratio comes from one
  ``countTokens`` call over a sample of ``cost.count_tokens_sample`` prompts spread over the job
  (reservoir sampling, seeded by the job id; cut to :data:`MAX_SAMPLE_CHARS` characters); a job no
  larger than the sample is counted exactly.
  Otherwise, or when the call fails, the local rule: 4 characters a token (Google's rule of thumb).
  Structured-output schemas are not counted.
* output tokens: per request its ``max_output_tokens``, else ``cost.default_output_tokens``, times
  its ``candidate_count``, plus its ``thinking_budget`` when that caps the thinking (thinking tokens
  are billed as output; a full budget is the most a request can spend on them). The service counts
  thinking within ``max_output_tokens`` too, so with both set this errs high, as a budget guard should.
  The thinking of models left to decide (no budget, or -1) is what this guess misses most; the
  actual cost tells.

Actual: the ``usageMetadata`` totals of the results (prompt at the input price; candidates and
thoughts at the output price).

Budgets: ``cost.job_budget`` holds a job whose estimate exceeds it; ``cost.daily_budget`` holds a
job whose estimate, added to what jobs let through in the last 24 hours count (their actual cost
once delivered, else their estimate), exceeds it. With a budget set, a job that cannot be priced
(unknown model) is held too: spending blindly is what a budget is there to prevent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

from batchd import hookimpl
from batchd.costs import DAY_SECONDS

#: The local estimate: characters per token (Google: "a token is about 4 characters").
CHARS_PER_TOKEN = 4.0
#: The sample sent to countTokens is cut to this many characters (long documents): one modest request.
MAX_SAMPLE_CHARS = 2_000_000


def _rate(settings, model: str | None) -> tuple[str, float, float] | None:
    """(priced as, input and output price per token after the batch discount), or None."""
    found = settings.cost.price_for(model or settings.model)
    if found is None:
        return None
    name, price = found
    factor = (1 - settings.cost.batch_discount) / 1_000_000
    return name, price.input * factor, price.output * factor


def _thinking_cap(config: Mapping[str, Any]) -> int:
    """The thinking tokens a request's config caps its thinking at; 0 when it is off or has no cap."""
    thinking = config.get("thinking_config")
    budget = thinking.get("thinking_budget") if isinstance(thinking, Mapping) else None
    return budget if isinstance(budget, int) and budget > 0 else 0


def _round(amount: float) -> float:
    return round(amount, 8)


@hookimpl
def estimate_cost(job, requests, count_tokens, settings) -> dict[str, Any]:
    cost = settings.cost
    sample_size = cost.count_tokens_sample
    sample: list[str] = []
    sampler = random.Random(job.id)
    chars = sample_chars = 0
    output_tokens = 0
    count = 0
    for request in requests:
        text = request.prompt
        system = request.config.get("system_instruction")
        if system:
            text = f"{system}\n{text}"
        chars += len(text)
        per_answer = request.config.get("max_output_tokens") or cost.default_output_tokens
        output_tokens += per_answer * (request.config.get("candidate_count") or 1) + _thinking_cap(request.config)
        # Reservoir sampling: every request is equally likely to be counted, in one pass.
        if count < sample_size:
            sample.append(text)
        else:
            slot = sampler.randrange(count + 1)
            if slot < sample_size:
                sample[slot] = text
        count += 1
    sample_chars = sum(len(text) for text in sample)
    while len(sample) > 1 and sample_chars > MAX_SAMPLE_CHARS:
        sample_chars -= len(sample.pop())  # the reservoir is in no particular order: any one may go
    method = f"local: {CHARS_PER_TOKEN:g} characters a token"
    input_tokens = round(chars / CHARS_PER_TOKEN)
    if cost.count_tokens and count_tokens is not None and sample:
        try:
            counted = count_tokens(sample)
        except Exception as error:  # the estimate falls back; the job is not at stake
            method += f" (countTokens failed: {type(error).__name__}: {error})"
        else:
            if len(sample) == count and sample_chars == chars:
                input_tokens, method = counted, f"countTokens: all {count} prompts"
            elif sample_chars:
                input_tokens = round(chars * counted / sample_chars)
                method = f"countTokens: {len(sample)} of {count} prompts, scaled by characters"
    estimate = {"cost": None, "currency": cost.currency, "input_tokens": input_tokens,
                "output_tokens": output_tokens, "requests": count, "method": method}
    rate = _rate(settings, job.model)
    if rate is None:
        estimate["error"] = f"no price for model {job.model!r}: add it under [cost.prices] in config.toml"
        return estimate
    priced_as, input_rate, output_rate = rate
    estimate["cost"] = _round(input_tokens * input_rate + output_tokens * output_rate)
    estimate["priced_as"] = priced_as
    return estimate


@hookimpl
def budget_applies(settings) -> bool:
    return settings.cost.job_budget is not None or settings.cost.daily_budget is not None


@hookimpl
def check_budget(job, estimate, spent_since, settings) -> str | None:
    cost = settings.cost
    if cost.job_budget is None and cost.daily_budget is None:
        return None
    amount = (estimate or {}).get("cost")
    if amount is None:
        why = (estimate or {}).get("error") or "no estimate"
        return f"its cost is unknown ({why}), so it cannot be checked against the budget"
    currency = cost.currency
    if cost.job_budget is not None and amount > cost.job_budget:
        return f"estimated {amount:.4f} {currency} is over the per-job budget of {cost.job_budget:g} {currency}"
    if cost.daily_budget is not None:
        spent = spent_since(time.time() - DAY_SECONDS)
        if spent + amount > cost.daily_budget:
            return (f"estimated {amount:.4f} {currency} on top of {spent:.4f} {currency} spent in the last 24 h "
                    f"is over the daily budget of {cost.daily_budget:g} {currency}")
    return None


@hookimpl
def account_cost(job, usage, settings) -> dict[str, Any]:
    output_tokens = usage.get("output_tokens", 0) + usage.get("thoughts_tokens", 0)
    actual = {"cost": None, "currency": settings.cost.currency, "input_tokens": usage.get("prompt_tokens", 0),
              "output_tokens": output_tokens, "requests": usage.get("requests", 0)}
    rate = _rate(settings, job.model)
    if rate is None:
        actual["error"] = f"no price for model {job.model!r}"
        return actual
    priced_as, input_rate, output_rate = rate
    actual["cost"] = _round(actual["input_tokens"] * input_rate + output_tokens * output_rate)
    actual["priced_as"] = priced_as
    return actual
