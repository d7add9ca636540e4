"""/v1/webhooks: a project's subscriptions to job and sweep events, and their delivery logs."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response

from api.deps import ProjectDep, ReadSessionDep, SessionDep
from api.schemas.common import LOCATION
from api.schemas.webhooks import (
    DeliveryList,
    DeliveryRead,
    DeliveryStatus,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookRead,
)
from store import webhooks
from store.models import Webhook
from store.repo import as_utc

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


def _read(w: Webhook) -> WebhookRead:
    return WebhookRead(id=w.id, url=w.url, events=list(w.events), description=w.description,
                       created_at=as_utc(w.created_at))


def _not_found(webhook_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no webhook {webhook_id!r}")


@router.post("", response_model=WebhookCreated, status_code=201, responses={201: {"headers": LOCATION}})
def create_webhook(body: WebhookCreate, session: SessionDep, project: ProjectDep, response: Response) -> WebhookCreated:
    """Subscribe ``url`` to events of this project's jobs and sweeps. Each event is POSTed as JSON
    ``{"id", "type", "created_at", "data"}``, signed in ``Trainyard-Signature`` (``t=<unix
    time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, as Stripe does; ``client.webhooks.verify``
    checks it), with its id in ``Trainyard-Event-Id``. A delivery that does not get a 2xx is
    retried with exponential backoff for 3 days (``TRAINYARD_WEBHOOK_MAX_AGE_S``)."""
    secret = body.secret or "whsec_" + secrets.token_urlsafe(24)
    hook = webhooks.create(session, project_id=project, url=body.url, events=body.events, secret=secret,
                           description=body.description)
    session.commit()
    response.headers["Location"] = f"/v1/webhooks/{hook.id}"
    return WebhookCreated(**_read(hook).model_dump(), secret=secret)


@router.get("", response_model=WebhookList)
def list_webhooks(session: ReadSessionDep, project: ProjectDep) -> WebhookList:
    return WebhookList(webhooks=[_read(w) for w in webhooks.list_for_project(session, project)])


@router.get("/{webhook_id}", response_model=WebhookRead, responses={404: {"description": "no such webhook"}})
def get_webhook(webhook_id: str, session: ReadSessionDep, project: ProjectDep) -> WebhookRead:
    hook = webhooks.get(session, webhook_id, project)
    if hook is None:
        raise _not_found(webhook_id)
    return _read(hook)


@router.delete("/{webhook_id}", status_code=204, response_class=Response,
               responses={404: {"description": "no such webhook"}})
def delete_webhook(webhook_id: str, session: SessionDep, project: ProjectDep) -> Response:
    """Unsubscribe: no more deliveries (undelivered ones are dropped), and its log goes."""
    if not webhooks.remove(session, webhook_id, project):
        raise _not_found(webhook_id)
    session.commit()
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList,
            responses={404: {"description": "no such webhook"}})
def list_deliveries(
    webhook_id: str,
    session: ReadSessionDep,
    project: ProjectDep,
    status: Annotated[list[DeliveryStatus] | None, Query(description="repeat to give several")] = None,
    cursor: Annotated[str | None, Query(pattern="^[0-9]{1,18}$", description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DeliveryList:
    """The delivery log, newest first: each event's status (pending, delivered, failed), tries,
    the receiver's last answer and when it is tried next."""
    if webhooks.get(session, webhook_id, project) is None:
        raise _not_found(webhook_id)
    rows = webhooks.deliveries(session, webhook_id, status=status or (), before=int(cursor) if cursor else None,
                               limit=limit)
    page = rows[:limit]
    return DeliveryList(
        deliveries=[
            DeliveryRead(
                event_id=d.event_id, event=d.event, job_id=d.job_id, sweep_id=d.sweep_id, status=d.status,  # type: ignore[arg-type]
                attempts=d.attempts, last_status_code=d.last_status_code, last_error=d.last_error,
                created_at=as_utc(d.created_at), next_attempt_at=as_utc(d.next_attempt_at) if d.status == "pending" else None,
                delivered_at=as_utc(d.delivered_at), data=d.data,
            )
            for d in page
        ],
        next_cursor=str(page[-1].id) if len(rows) > limit else None,
    )
