"""Reusable test building blocks: real servers on loopback (port 0) and a polling helper.

DnsServer (threaded, UDP+TCP), MxSink (aiosmtpd in the running loop), WebhookSink (HTTP in the
running loop), RawSmtp (an SMTP client that sends exact bytes) and wait_until.
"""

from __future__ import annotations

from .dns import DnsServer
from .mx_sink import MxSink, Received
from .raw_smtp import RawSmtp
from .wait import wait_until
from .webhook_sink import WebhookRequest, WebhookSink

__all__ = [
    "DnsServer", "MxSink", "RawSmtp", "Received", "WebhookRequest", "WebhookSink", "wait_until",
]
