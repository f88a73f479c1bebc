"""The ``cost`` plugin: a job's price before it is submitted, its actual cost after, and budgets.

Price table: ``cost.prices`` over :data:`batchd.config.DEFAULT_PRICES` (standard USD per million
tokens), times ``1 - cost.batch_discount`` (Batch API: half price). A model is priced by its exact
name, else by the longest table name it starts with (``gemini-2.5-flash-preview-09-2025`` costs
what ``gemini-2.5-flash`` costs, ``gemini-2.5-flash-lite-…`` what ``gemini-2.5-flash-lite`` costs).
Prompt tokens served from a context cache cost the table's ``cached_input`` price, batch or not
(Google prices cache hits as for interactive traffic). Every price comes with the *standard* price
of the same tokens (what the interactive API would have charged) and the *saving*.

Estimate (one pass over the job's requests, constant memory):

* input tokens: the characters of every prompt and system instruction, turned into tokens by a
  ratio. With ``cost.count_tokens`` and a provider that counts tokens, the ratio comes from one
  ``countTokens`` call over a sample of ``cost.count_tokens_sample`` prompts spread over the job
  (reservoir sampling, seeded by the job id; cut to :data:`MAX_SAMPLE_CHARS` characters); a job no
  larger than the sample is counted exactly. batchd answers a small sample from the ratio earlier
  calls measured for the model instead of a call of its own (the method then says ``countTokens
  ratio``), so a burst of small jobs does not make a round trip each.
  Otherwise, or when the call fails, the local rule: 4 characters a token (Google's rule of thumb).
  Structured-output schemas are not counted. Files sent with a request (a folder input,
  ``file_column``, a task's own) add what Google bills for their kind, a unit guessed from their
  size (:func:`file_tokens`): 258 an image, 258 a PDF page, 32 a second of audio, 263 of video,
  a token per 4 bytes of text.
* output tokens: what earlier jobs of the same task and model produced per request (answer and
  thoughts, kept in the journal; at most a request's ``max_output_tokens``), once at least
  :data:`MIN_OBSERVED_REQUESTS` requests of theirs came back. Before that, a request's
  ``max_output_tokens``, else ``cost.default_output_tokens``, plus its ``thinking_budget`` when that
  caps the thinking (thinking tokens are billed as output; a full budget is the most a request can
  spend on them; the service counts thinking within ``max_output_tokens`` too, so with both set
  this errs high, as a budget guard should). Times its ``candidate_count``.
  Embeddings (``job.kind`` "embed") have none: their texts (and titles) are all they are billed for.

Actual: the ``usageMetadata`` totals of the results (prompt at the input price, its cached part at
the cached price; candidates and thoughts at the output price).

Budgets: ``cost.job_budget`` holds a job whose estimate exceeds it; ``cost.daily_budget`` holds a
job whose estimate, added to what jobs let through in the last 24 hours count (their actual cost
once delivered, else their estimate), exceeds it. With a budget set, a job that cannot be priced
(unknown model) is held too: spending blindly is what a budget is there to prevent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchd import hookimpl
from batchd.costs import DAY_SECONDS

#: The local estimate: characters per token (Google: "a token is about 4 characters").
CHARS_PER_TOKEN = 4.0
#: The sample sent to countTokens is cut to this many characters (long documents): one modest request.
MAX_SAMPLE_CHARS = 2_000_000
#: Earlier requests of a task and model needed before their output replaces the rule in estimates.
MIN_OBSERVED_REQUESTS = 20
#: Tokens Google bills a file part for, per unit (docs: "Understand and count tokens"), and the bytes
#: a unit is guessed to take when only the file's size is known: a PDF page of ~100 KB, audio at
#: 128 kbit/s, video at ~1 Mbit/s. An image is one unit (258 tokens up to 384 px a side; larger
#: ones are tiled, so this errs low).
FILE_TOKENS = {"image": (258, None), "application/pdf": (258, 100_000), "audio": (32, 16_000),
               "video": (263, 125_000), "text": (1, 4)}


def file_tokens(mime_type: str, size: int | None) -> int:
    """The tokens a file of ``mime_type`` and ``size`` bytes is guessed to cost as a prompt part."""
    rule = FILE_TOKENS.get(mime_type) or FILE_TOKENS.get(mime_type.partition("/")[0]) or (258, None)
    tokens, unit_bytes = rule
    if unit_bytes is None or not size:
        return tokens
    return tokens * max(1, -(-size // unit_bytes))


@dataclass(frozen=True)
class Rates:
    """One model's prices per token: batch (after ``cost.batch_discount``) and standard (interactive)."""

    priced_as: str
    input: float
    output: float
    cached_input: float | None  # context-cache hits: the interactive price, batch or not; None: as input
    discount: float

    def batch(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        cached_tokens = cached_tokens if self.cached_input is not None else 0
        discounted = ((input_tokens - cached_tokens) * self.input + output_tokens * self.output) * (1 - self.discount)
        return _round(discounted + cached_tokens * (self.cached_input or 0.0))

    def standard(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        cached_tokens = cached_tokens if self.cached_input is not None else 0
        return _round((input_tokens - cached_tokens) * self.input + cached_tokens * (self.cached_input or 0.0)
                      + output_tokens * self.output)


def _rates(settings, model: str | None) -> Rates | None:
    found = settings.cost.price_for(model or settings.model)
    if found is None:
        return None
    name, price = found
    per_token = 1 / 1_000_000
    cached = None if price.cached_input is None else price.cached_input * per_token
    return Rates(name, price.input * per_token, price.output * per_token, cached, settings.cost.batch_discount)


def _priced(record: dict, rates: Rates | None, model: str | None, cached_tokens: int = 0) -> dict:
    """``record`` (tokens counted) with its batch cost, its standard (interactive) price and the saving."""
    if rates is None:
        record["error"] = f"no price for model {model!r}: add it under [cost.prices] in config.toml"
        return record
    tokens = (record["input_tokens"], record["output_tokens"], cached_tokens)
    record["cost"] = rates.batch(*tokens)
    record["standard_cost"] = rates.standard(*tokens)
    record["saving"] = _round(record["standard_cost"] - record["cost"])
    record["priced_as"] = rates.priced_as
    return record


def _thinking_cap(config: Mapping[str, Any]) -> int:
    """The thinking tokens a request's config caps its thinking at; 0 when it is off or has no cap."""
    thinking = config.get("thinking_config")
    budget = thinking.get("thinking_budget") if isinstance(thinking, Mapping) else None
    return budget if isinstance(budget, int) and budget > 0 else 0


def _round(amount: float) -> float:
    return round(amount, 8)


def _output_guess(observed: dict | None) -> float | None:
    """Output tokens (thoughts included) per request that earlier jobs of this task and model produced."""
    if not observed or observed.get("requests", 0) < MIN_OBSERVED_REQUESTS:
        return None
    return observed["output_tokens"] / observed["requests"]


@hookimpl
def estimate_cost(job, requests, count_tokens, settings, observed_output) -> dict[str, Any]:
    cost = settings.cost
    sample_size = cost.count_tokens_sample
    sample: list[str] = []
    sampler = random.Random(job.id)
    chars = sample_chars = 0
    output_tokens = 0.0
    observed = _output_guess(observed_output)
    embeds = job.kind == "embed"
    count = files = file_input_tokens = 0
    for request in requests:
        for part in request.files:
            files += 1
            file_input_tokens += file_tokens(getattr(part, "mime_type", None) or "", getattr(part, "size", None))
        text = request.prompt
        # An embedding's title is embedded with its text; a system instruction is sent with a prompt.
        preamble = request.config.get("title" if embeds else "system_instruction")
        if preamble:
            text = f"{preamble}\n{text}"
        chars += len(text)
        if not embeds:  # embeddings have no output tokens
            cap = request.config.get("max_output_tokens")
            candidates = request.config.get("candidate_count") or 1
            if observed is not None:  # answers and thoughts, as this task and model produced them
                output_tokens += (min(observed, cap) if cap else observed) * candidates
            else:
                output_tokens += (cap or cost.default_output_tokens) * candidates + _thinking_cap(request.config)
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
            # "countTokens", or the ratio earlier calls measured for the model (batchd's counter says which).
            how = getattr(count_tokens, "method", "countTokens")
            if len(sample) == count and sample_chars == chars:
                input_tokens, method = counted, f"{how}: all {count} prompts"
            elif sample_chars:
                input_tokens = round(chars * counted / sample_chars)
                method = f"{how}: {len(sample)} of {count} prompts, scaled by characters"
    if files:
        input_tokens += file_input_tokens
        method += f"; {files} file(s): {file_input_tokens} tokens by kind and size"
    if embeds:
        output_method = "none: embeddings have no output tokens"
    elif observed is not None:
        output_method = (f"observed: {observed:.1f} tokens a request, as {observed_output['requests']} earlier"
                         f" requests of this task and model produced")
    else:
        output_method = "max_output_tokens, else cost.default_output_tokens, a request"
    estimate = {"cost": None, "currency": cost.currency, "input_tokens": input_tokens,
                "output_tokens": round(output_tokens), "requests": count, "method": method,
                "output_method": output_method}
    return _priced(estimate, _rates(settings, job.model), job.model)


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
    cached_tokens = usage.get("cached_tokens", 0)
    actual = {"cost": None, "currency": settings.cost.currency, "input_tokens": usage.get("prompt_tokens", 0),
              "output_tokens": output_tokens, "requests": usage.get("requests", 0)}
    if cached_tokens:
        actual["cached_tokens"] = cached_tokens
    return _priced(actual, _rates(settings, job.model), job.model, cached_tokens)
