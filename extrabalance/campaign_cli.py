"""`extrabalance campaign`: preview (dry run), queue, list or cancel advertisement
campaigns in the node's ledger. The command only translates arguments and prints;
choosing the audience and queueing it is `service.campaign.CampaignService`'s job."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.ledger.ads_store import CampaignRow
from extrabalance.ledger.factory import open_ledger
from extrabalance.observability import mask_msisdn
from extrabalance.service.campaign import CampaignService


def campaign_command(
    settings: Any,
    *,
    template: str | None,
    segment: str | None,
    dry_run: bool,
    limit: int | None,
    list_only: bool = False,
    cancel: str | None = None,
    who: str = "cli",
    json_output: bool = False,
    out: Any = None,
) -> int:
    """The CLI: preview (dry run), queue, list or cancel campaigns in the node's ledger.
    Exit codes: 0 done, 2 bad arguments."""
    out = out or sys.stdout
    policy = settings.policy()
    if segment is not None and segment not in {s.name for s in policy.segments}:
        print(f"extrabalance campaign: no segment named {segment!r}", file=sys.stderr)
        return 2
    if limit is not None and limit < 1:
        print("extrabalance campaign: --limit must be at least 1", file=sys.stderr)
        return 2
    if not (list_only or cancel):
        missing = [lang for lang, table in settings.templates.items() if template not in table]
        if template is None or missing:
            print(
                f"extrabalance campaign: template {template!r} is missing in "
                f"[templates.{', '.join(missing) or '?'}]",
                file=sys.stderr,
            )
            return 2

    def show(msisdn: str) -> str:
        return mask_msisdn(msisdn) if settings.node.mask_msisdn_in_logs else msisdn

    async def main() -> int:
        ledger = open_ledger(settings.storage)
        try:
            service = CampaignService(ledger, None, policy, SYSTEM_CLOCK.now,
                                      send_rate_max_per_s=settings.ads.campaign.send_rate_max_per_s)
            if list_only:
                rows = await service.list()
                if json_output:
                    print(json.dumps([_row(r) for r in rows]), file=out)
                for r in rows if not json_output else ():
                    print(
                        f"{r.campaign_id}  {r.state:<9} {r.template:<16} "
                        f"segment={r.segment or '*'}  recipients={r.recipients} sent={r.sent} "
                        f"suppressed={r.suppressed} pending={r.pending}  {r.created_at}",
                        file=out,
                    )
                return 0
            if cancel:
                done = await service.cancel(cancel)
                print(
                    f"campaign {cancel}: {'cancelled' if done else 'not active (or unknown)'}",
                    file=out,
                )
                return 0 if done else 2
            audience = await service.preview(segment, limit)
            rate = settings.ads.campaign.send_rate_max_per_s
            if dry_run:
                if json_output:
                    print(
                        json.dumps(
                            {
                                "count": audience.count,
                                "template": template,
                                "segment": segment,
                                "limit": limit,
                                "sample": [show(m) for m in audience.sample],
                            }
                        ),
                        file=out,
                    )
                else:
                    print(
                        f"{audience.count} subscribers would get {template!r} "
                        f"(segment {segment or 'any'}, limit {limit or 'none'}); dry run, "
                        f"nothing queued.",
                        file=out,
                    )
                    for m in audience.sample:
                        print(f"  {show(m)}", file=out)
                    print(
                        f"At {rate}/s that takes about {audience.count / rate / 60:.1f} "
                        f"minutes of sending outside quiet hours.",
                        file=out,
                    )
                return 0
            row = await service.create(template or "", segment, limit, who)
            if json_output:
                print(json.dumps(_row(row)), file=out)
            else:
                print(
                    f"campaign {row.campaign_id} queued: {row.recipients} recipients, "
                    f"template {template!r}. A running node sends it at up to {rate}/s "
                    f"outside quiet hours; caps and opt-outs still apply per recipient. "
                    f"Follow it with `extrabalance campaign --list`.",
                    file=out,
                )
            return 0
        finally:
            await ledger.close()

    return asyncio.run(main())


def _row(row: CampaignRow) -> dict[str, Any]:
    return {
        "campaign_id": row.campaign_id,
        "template": row.template,
        "segment": row.segment,
        "state": row.state,
        "recipients": row.recipients,
        "sent": row.sent,
        "suppressed": row.suppressed,
        "pending": row.pending,
        "created_by": row.created_by,
        "created_at": row.created_at,
    }
