"""The ``email`` notification plugin: job events by email or chat, through apprise.

``[notify.email] urls`` are apprise URLs, so one plugin covers email (``mailto://``,
``mailtos://``) and the chat and push services apprise knows (``slack://``, ``discord://``,
``ntfy://``, ``tgram://``, ...; see the apprise documentation). They carry credentials: they are
kept as secrets and never logged. ``events`` selects the kinds (default: the ones a person wants to
hear about: held and the final outcomes).

A notification that apprise reports as not sent to every URL makes the call raise, so batchd
retries it with backoff (``[notify]``).
"""

from __future__ import annotations

from batchd import hookimpl


def title(event) -> str:
    return f"batchd: job {event['job']} {event['kind']}"


def body(event) -> str:
    lines = [f"Job {event['job']} ({event['job_id']}, task {event['task']}, model {event['model']}): {event['kind']}."]
    if event.get("reason"):
        lines.append(f"Held because {event['reason']}. Release it with: batchd approve {event['job']}")
    counts = event.get("counts") or {}
    if counts:
        lines.append("Requests: " + ", ".join(f"{key} {value}" for key, value in counts.items()))
    cost = event.get("cost") or {}
    if cost.get("estimate") is not None or cost.get("actual") is not None:
        lines.append(f"Cost: estimate {cost.get('estimate')}, actual {cost.get('actual')} {cost.get('currency') or ''}".rstrip())
    if event.get("error"):
        error = event["error"]
        lines.append(f"Error: {error.get('message') if isinstance(error, dict) else error}")
    if event.get("outbox"):
        lines.append(f"Results: {event['outbox']}")
    lines.append(f"Event {event['id']} at {event['time']}")
    return "\n".join(lines)


@hookimpl
def job_event_kinds(settings):
    return settings.notify.email.event_kinds()


@hookimpl
def job_event(event, settings) -> None:
    config = settings.notify.email
    if not config.wants(event["kind"]):
        return
    import apprise  # here, not at the top: loading plugins stays fast for every other command

    notifier = apprise.Apprise()
    for number, url in enumerate(config.urls, 1):
        if not notifier.add(url.get_secret_value()):
            raise ValueError(f"[notify.email] urls entry {number} is not a URL apprise understands")
    if not notifier.notify(title=title(event), body=body(event), body_format=apprise.NotifyFormat.TEXT):
        raise RuntimeError(f"apprise could not deliver {event['id']} to every [notify.email] URL")
