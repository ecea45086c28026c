"""Fetch an http(s) image URL for a request without letting the client aim the server inward.

Every hop (the URL and each redirect, followed here, at most `image_url_max_redirects`) is
resolved first and refused unless every address it resolves to is public; the connection then
goes to the checked address (Host header and TLS SNI keep the name), so a second DNS answer
cannot swap in an inner one. Size and total time are bounded; nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from lvlm_fix.service.config import ServeConfig

DEFAULT_PORTS = {"http": 80, "https": 443}


class FetchRefused(Exception):
    """A URL this server will not fetch, or a fetch that failed (the client's to fix)."""

    def __init__(self, message: str, status: int = 400, code: str = "image_url_refused"):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


async def fetch(url: str, config: ServeConfig) -> bytes:
    """The image's bytes, or FetchRefused (400: refused or unreachable; 413: too large)."""
    try:
        async with asyncio.timeout(config.image_url_timeout_s):
            return await _follow(httpx.URL(url), config)
    except TimeoutError:
        limit = config.image_url_timeout_s
        raise FetchRefused(f"fetching the image took longer than {limit:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise FetchRefused(f"could not fetch the image: {error}") from None


async def _follow(url: httpx.URL, config: ServeConfig) -> bytes:
    # trust_env=False: a proxy from the environment would connect on our behalf, unchecked.
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
        for _ in range(config.image_url_max_redirects + 1):
            request = await _pinned_request(client, url, config)
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect and "location" in response.headers:
                    url = url.join(response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchRefused(f"the image URL answered HTTP {response.status_code}")
                return await _read(response, config.max_image_bytes)
            finally:
                await response.aclose()
    raise FetchRefused(f"the image URL redirected more than {config.image_url_max_redirects} times")


async def _pinned_request(client: httpx.AsyncClient, url: httpx.URL, config: ServeConfig):
    """A GET of `url` sent to an address checked here (Host and SNI name the URL's host)."""
    if url.scheme not in DEFAULT_PORTS or not url.host:
        raise FetchRefused("image URLs must be http(s)://host/...")
    port = url.port or DEFAULT_PORTS[url.scheme]
    allowed = f"{url.host}:{port}" in config.image_url_allow_hosts
    address = await _checked_address(url.host, port, allowed)
    headers = {"Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    pinned = url.copy_with(host=address)
    return client.build_request("GET", pinned, headers=headers, extensions=extensions)


async def _checked_address(host: str, port: int, allowed: bool) -> str:
    """The first address `host` resolves to, if every one of them may be fetched."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise FetchRefused(f"cannot resolve the image URL's host {host!r}") from None
    addresses = [info[4][0] for info in infos]
    if not allowed:
        for address in addresses:
            if not is_public(ipaddress.ip_address(address)):
                raise FetchRefused(
                    f"the image URL's host {host!r} is not a public address; this server "
                    "fetches images from public addresses only",
                    code="image_url_forbidden",
                )
    return addresses[0]


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not loopback, private, link-local, multicast, reserved or
    unspecified (an IPv4-mapped IPv6 address is judged by its IPv4 address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    inner = (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
    return address.is_global and not inner


async def _read(response: httpx.Response, limit: int) -> bytes:
    too_large = FetchRefused(f"the image at the URL exceeds {limit} bytes", 413, "image_too_large")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)
