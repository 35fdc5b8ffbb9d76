"""``/v1/jobs/{id}/play``: a progressive ``hls`` job's stream, playable while it runs.

The playlists are built on each request from the job record (``shared/playback.py``): they
grow as parts finish (``EVENT``), and end (``#EXT-X-ENDLIST``) once a rung is complete.
Segments are the encoded parts themselves, streamed from the store. Once the job has
succeeded its intermediates (the parts) are cleaned up, so the master playlist then
redirects to the packaged VOD (``outputs/package/master.m3u8``), which is what the job
view's ``playback_url`` names too; a player already playing keeps what it fetched and
reloads nothing after ``#EXT-X-ENDLIST``.

Every route needs the job's tenant's key, like every other job route: a player sends it
as a header (the dashboard's hls.js does, in ``xhrSetup``), never in the URL. Playlists are
``no-store`` (they change); segments never change and may be cached.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, Response, get
from litestar.params import FromPath
from litestar.response import Redirect, Stream

from functions.gateway.deps import ServicesDep
from functions.gateway.openapi import errors, response_media
from functions.gateway.views import CHUNK, load_job, tenant_of
from shared import playback
from shared.errors import ErrorCode, PermanentError
from shared.jobstate import JobRecord, JobStatus

PLAYLIST = "application/vnd.apple.mpegurl"
_RUNG = re.compile(r"^([a-z0-9][a-z0-9_-]{0,31})\.m3u8$")
_SEGMENT = re.compile(r"^(0|[1-9][0-9]{0,6})\.ts$")
NO_STORE = {"Cache-Control": "no-store"}


def _not_playable(job_id: str, what: str) -> PermanentError:
    return PermanentError(ErrorCode.NOT_FOUND, f"job {job_id} has no playable {what} (yet)")


def _rung(record: JobRecord, name: str) -> playback.Rung:
    for rung in playback.listed(record):
        if rung.name == name:
            return rung
    raise _not_playable(record.job_id, f"rung {name!r}")


class PlaybackController(Controller):
    path = "/jobs/{job_id:str}/play"

    @get("/master.m3u8", responses=errors(404, 503),
         opt=response_media(PLAYLIST, "The master playlist (HLS)"))
    async def master(self, request: Request[Any, Any, Any], services: ServicesDep,
                     job_id: FromPath[str]) -> Response[str] | Redirect:
        """The master playlist: the fast rung as soon as the job is playable, every other
        rung once complete; after success a redirect to the packaged VOD."""
        record = await load_job(services, tenant_of(request), job_id)
        vod = playback.packaged_master(record)
        if record.status == JobStatus.SUCCEEDED and vod is not None:
            base = services.settings.base_url
            return Redirect(f"{base}/v1/jobs/{job_id}/outputs/{vod[0]}/{vod[1]}",
                            status_code=307, headers=NO_STORE)
        text = playback.master_playlist(record)
        if text is None:
            raise _not_playable(job_id, "stream")
        return Response(text, media_type=PLAYLIST, headers=NO_STORE)

    @get("/{playlist:str}", responses=errors(404, 503),
         opt=response_media(PLAYLIST, "A rung's media playlist (HLS), growing while the job "
                                      "runs"))
    async def media(self, request: Request[Any, Any, Any], services: ServicesDep,
                    job_id: FromPath[str], playlist: FromPath[str]) -> Response[str]:
        """A rung's media playlist (``360p.m3u8``): its finished parts from the start."""
        match = _RUNG.match(playlist)
        if match is None or playlist == "master.m3u8":
            raise _not_playable(job_id, f"playlist {playlist[:40]!r}")
        record = await load_job(services, tenant_of(request), job_id)
        rung = _rung(record, match.group(1))
        return Response(playback.media_playlist(record, rung), media_type=PLAYLIST,
                        headers=NO_STORE)

    @get("/{rung:str}/{segment:str}", responses=errors(404, 503),
         opt=response_media("video/mp2t", "One segment (MPEG-TS): one encoded part"))
    async def segment(self, request: Request[Any, Any, Any], services: ServicesDep,
                      job_id: FromPath[str], rung: FromPath[str],
                      segment: FromPath[str]) -> Stream:
        """Segment ``<i>.ts`` of a rung: part ``i`` as its encoder wrote it."""
        match = _SEGMENT.match(segment)
        record = await load_job(services, tenant_of(request), job_id)
        found = _rung(record, rung)
        index = int(match.group(1)) if match else -1
        if not 0 <= index < found.ready:
            raise _not_playable(job_id, f"segment {rung}/{segment[:40]}")
        key = found.keys[index]
        info = await services.store.stat(key)

        async def body() -> AsyncIterator[bytes]:
            async for chunk in services.store.iter_chunks(key, CHUNK):
                yield chunk

        return Stream(body(), media_type="video/mp2t",
                      headers={"Content-Length": str(info.size),
                               "Cache-Control": "private, max-age=86400, immutable"})
