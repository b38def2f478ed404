"""Signaling over HTTP: dialling a peer with an offer, and answering the offers of others.

The initiator POSTs its signed SDP offer (:mod:`daemon.net.signaling`, which is pure) to the
peer's ``/v1/mesh/signal``; the answer comes back in the response (non-trickle ICE: every
candidate is in the SDP). A refusal comes back as 400/403/409/421/429/503 with the reason,
and the initiator raises it as LinkError. The offer is signed for the responder's node id;
an initiator that does not know it (``--join HOST:PORT``) learns it from the 421 refusal of
an offer that names none, and signs again. Either side checks the other's Hello (not itself,
compatible) and registers the new link in the :class:`daemon.net.lifecycle.LinkTable`,
which settles duplicates; the link then comes up when its channels open.

The server answering offers listens only where the mesh does (127.0.0.1 in loopback mode;
NodeConfig.signal_host). Its headers must arrive within the API's HEADER_TIMEOUT_S (it is
started by ``daemon.api.app.ApiServer.start``), an offer's body within BODY_TIMEOUT_S, at most
MAX_BODY_BYTES of it; a client that stalls is answered 408 and dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from daemon.hostport import parse_host_port
from daemon.net.aiortc_tuning import loopback_ice, rtc
from daemon.net.lifecycle import Link, LinkTable
from daemon.net.link_events import LinkError
from daemon.net.loopback import is_loopback_host, usable_candidates
from daemon.net.signaling import (
    MAX_BODY_BYTES,
    SIGNAL_PATH,
    Authenticator,
    SignalingRefused,
    answer_from_json,
    answer_to_json,
    error_node_id,
    error_reason,
    error_to_json,
    offer_from_json,
    offer_to_json,
)
from meshllm.wire import Hello

log = logging.getLogger(__name__)

BODY_TIMEOUT_S = 10.0
"""An offer (a few KiB) must arrive whole within this long."""


class SignalingEndpoint:
    """Both sides of signaling for one node. ``new_link(initiator_id)`` makes a link (its
    peer connection and channels); ``hello()`` is what this node says about itself now."""

    def __init__(self, *, auth: Authenticator, hello: Callable[[], Hello],
                 is_compatible: Callable[[Hello], str | None], loopback: bool,
                 connect_timeout_s: float, table: LinkTable,
                 new_link: Callable[[str], Link], is_running: Callable[[], bool],
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self._auth = auth
        self._hello = hello
        self._is_compatible = is_compatible
        self._loopback = loopback
        self._connect_timeout_s = connect_timeout_s
        self._table = table
        self._new_link = new_link
        self._is_running = is_running
        self._body_timeout_s = body_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        """Create the HTTP client used to dial (on the running loop)."""
        timeout = aiohttp.ClientTimeout(total=self._connect_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # --- the initiator --------------------------------------------------------------------

    async def connect(self, address: str, peer_id: str | None = None) -> str:
        """See ``LinkManager.connect``."""
        try:
            host, port = parse_host_port(address)
        except ValueError as exc:
            raise LinkError(f"cannot connect to {address!r}: not HOST:PORT") from exc
        if self._loopback and not is_loopback_host(host):
            raise LinkError(f"loopback mode: will not connect to {address} (not 127.0.0.1)")
        try:
            self._table.check_capacity()
        except SignalingRefused as exc:
            raise LinkError(exc.reason) from exc
        link = self._new_link(self._hello().node_id)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await self._initiate(link, address, host, port, peer_id)
        except TimeoutError:
            self._table.finish(link, "connect timeout")
            raise LinkError(f"timed out connecting to {address}", link.peer_id) from None
        except BaseException:
            self._table.finish(link, "connect failed")
            raise

    async def _initiate(self, link: Link, address: str, host: str, port: int,
                        peer_id: str | None) -> str:
        with loopback_ice(self._loopback):
            await link.pc.setLocalDescription(await link.pc.createOffer())
        sdp = link.pc.localDescription.sdp
        offer = self._auth.sign_offer(self._hello(), sdp, time.time(), to=peer_id)
        status, body = await self._post(address, host, port, offer_to_json(offer))
        if status == 421 and peer_id is None and (responder := error_node_id(body)) is not None:
            # the address's node id was not known (--join): the refusal says it; sign for it
            offer = self._auth.sign_offer(self._hello(), sdp, time.time(), to=responder)
            status, body = await self._post(address, host, port, offer_to_json(offer))
        if status != 200:
            reason = error_reason(body) or f"HTTP {status}"
            log.warning("%s refused a link: %s", address, reason)
            raise LinkError(f"{address} refused the link: {reason}")
        try:
            answer = answer_from_json(body)
            self._auth.verify_answer(answer, offer)
            if answer.hello.node_id != offer.to:
                raise SignalingRefused(403, f"the answer comes from {answer.hello.node_id}, "
                                            f"not {offer.to}")
            self._check_peer(answer.hello)
        except SignalingRefused as exc:
            log.warning("refusing the answer of %s: %s", address, exc.reason)
            raise LinkError(f"refused the answer of {address}: {exc.reason}") from exc
        sdp, candidates = usable_candidates(answer.sdp, loopback=self._loopback)
        if candidates == 0:
            raise LinkError(f"the answer of {address} has no usable ICE candidate")
        link.set_peer(answer.hello)
        try:
            self._table.register(link)
        except SignalingRefused as exc:
            raise LinkError(exc.reason, link.peer_id) from exc
        try:
            answer_sdp = rtc().RTCSessionDescription(sdp=sdp, type="answer")
            await link.pc.setRemoteDescription(answer_sdp)
        except Exception as exc:  # aiortc's SDP parser fails in many ways on bad input
            raise LinkError(f"bad SDP answer from {address}: {exc!r}", link.peer_id) from exc
        await link.settled.wait()
        if link.state != "up":
            raise LinkError(f"link to {link.peer_id} failed: {link.down_reason}", link.peer_id)
        assert link.peer_id is not None
        return link.peer_id

    async def _post(self, address: str, host: str, port: int,
                    body: dict[str, Any]) -> tuple[int, object]:
        assert self._session is not None
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{port}{SIGNAL_PATH}"
        try:
            async with self._session.post(url, json=body) as response:
                raw = await response.content.read(MAX_BODY_BYTES + 1)
                status = response.status
        except aiohttp.ClientError as exc:
            raise LinkError(f"cannot reach {address}: {exc}") from exc
        if len(raw) > MAX_BODY_BYTES:
            raise LinkError(f"the answer of {address} is over {MAX_BODY_BYTES} bytes")
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    # --- the responder --------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        """Answer an offer, or refuse it with 400/403/409/421/429/503 and the reason."""
        link: Link | None = None
        try:
            if not self._is_running():
                raise SignalingRefused(503, "this node is shutting down")
            offer = offer_from_json(await _read_json(request, self._body_timeout_s))
            peer = offer.hello.node_id
            try:
                self._auth.verify_offer(offer, time.time(), self._hello().node_id)
            except SignalingRefused as exc:
                if exc.status != 421:  # 421: an initiator that did not know this node's id
                    log.warning("refused a link from %s (%s): %s", peer, request.remote, exc.reason)
                raise
            self._check_peer(offer.hello)
            sdp, candidates = usable_candidates(offer.sdp, loopback=self._loopback)
            if candidates == 0:
                raise SignalingRefused(400, "the offer has no usable ICE candidate")
            self._table.check_capacity()
            link = self._new_link(peer)
            link.set_peer(offer.hello)
            with loopback_ice(self._loopback):
                try:
                    offer_sdp = rtc().RTCSessionDescription(sdp=sdp, type="offer")
                    await link.pc.setRemoteDescription(offer_sdp)
                    await link.pc.setLocalDescription(await link.pc.createAnswer())
                except Exception as exc:  # aiortc's SDP parser fails in many ways on bad input
                    raise SignalingRefused(400, f"bad SDP offer: {exc!r}") from exc
            if not self._is_running():
                raise SignalingRefused(503, "this node is shutting down")
            self._table.register(link)
            answer = self._auth.sign_answer(offer, self._hello(), link.pc.localDescription.sdp)
            log.info("answered a link offer from %s (%s)", peer, request.remote)
            return web.json_response(answer_to_json(answer))
        except SignalingRefused as exc:
            if exc.status != 403:
                log.info("refused a signaling request from %s: %s", request.remote, exc.reason)
            if link is not None:
                self._table.finish(link, "refused")
            return web.json_response(error_to_json(exc, self._hello().node_id), status=exc.status)
        except BaseException:
            if link is not None:
                self._table.finish(link, "signaling failed")
            raise

    def _check_peer(self, hello: Hello) -> None:
        if hello.node_id == self._hello().node_id:
            raise SignalingRefused(409, "that is this node")
        reason = self._is_compatible(hello)
        if reason is not None:
            raise SignalingRefused(409, f"incompatible: {reason}")


async def _read_json(request: web.Request, timeout_s: float) -> object:
    """The request's JSON body, at most MAX_BODY_BYTES, whole within ``timeout_s``;
    SignalingRefused(400/408/413) otherwise."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise SignalingRefused(413, f"body over {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while len(raw) <= MAX_BODY_BYTES:
                chunk = await request.content.read(MAX_BODY_BYTES + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
    except TimeoutError:
        raise SignalingRefused(408, f"the offer did not arrive within {timeout_s:g} s") from None
    if len(raw) > MAX_BODY_BYTES:
        raise SignalingRefused(413, f"body over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise SignalingRefused(400, f"body is not JSON: {exc}") from exc
