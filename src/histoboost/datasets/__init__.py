"""Public breast H&E data sets, fetched in one command: `catalogue` (where each lives, its checksum and licence),
`download` (resumable, checked), `unpack` (safe), `fetch` (all three, laid out as histoboost reads it)."""

from .catalogue import MANUAL, SOURCES, ManualSource, Source
from .fetch import Fetched, fetch, licence_text

__all__ = ["MANUAL", "SOURCES", "Fetched", "ManualSource", "Source", "fetch", "licence_text"]
