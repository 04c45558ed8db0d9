"""The image-URL policy's address checks, without a server (the end-to-end checks, with test
hosts in a network namespace, are in test_reliability.py)."""

import ipaddress
import socket

import httpx
import pytest

from server.errors import APIError
from server.images import _checked_request, is_public


@pytest.mark.parametrize("address,public", [
    ("93.184.215.14", True), ("2606:4700::1111", True), ("64:ff9b::808:808", True), ("2002:808:808::1", True),
    ("10.0.0.1", False), ("127.0.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("::1", False), ("fe80::1", False), ("fd00::1", False), ("ff0e::1", False),
    ("::ffff:10.0.0.1", False),  # IPv4-mapped
    ("64:ff9b::a00:5", False),  # NAT64 of 10.0.0.5
    ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
    ("::a00:5", False),  # IPv4-compatible 10.0.0.5
])
def test_only_public_unicast_addresses_count_as_public(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.fixture
def dns(monkeypatch):
    """Answers for getaddrinfo, one list per call, as a rebinding DNS server would give them."""
    answers = []

    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers.pop(0)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


async def test_the_request_goes_to_the_address_that_was_checked(dns):
    dns.extend([["93.184.215.14"], ["10.0.0.5"]])  # the second answer would rebind to the inside
    async with httpx.AsyncClient() as client:
        request = await _checked_request(client, "https://user:pw@images.example:8443/a.png?x=1",
                                         ["images.example"])
        assert str(request.url) == "https://93.184.215.14:8443/a.png?x=1"
        assert request.headers["host"] == "images.example:8443" and "authorization" not in request.headers
        assert request.extensions["sni_hostname"] == "images.example"  # TLS checks the name
        with pytest.raises(APIError) as e:
            await _checked_request(client, "https://images.example:8443/a.png", ["images.example"])
    assert e.value.code == "image_address_not_public"


@pytest.mark.parametrize("url,code", [
    ("http://[::1/x.png", "image_url"), ("http://images.example:99999/x.png", "image_url"),
    ("gopher://images.example/x.png", "image_url"), ("http://images.example.evil.org/x.png", "image_host_not_allowed"),
])
async def test_malformed_or_disallowed_urls_are_refused_before_any_lookup(dns, url, code):
    async with httpx.AsyncClient() as client:
        with pytest.raises(APIError) as e:
            await _checked_request(client, url, ["images.example"])
    assert e.value.status == 400 and e.value.code == code
    assert dns == []  # (an empty answer list: a lookup would have raised IndexError)


async def test_a_host_with_any_private_address_is_refused(dns):
    dns.append(["93.184.215.14", "10.0.0.5"])
    async with httpx.AsyncClient() as client:
        with pytest.raises(APIError) as e:
            await _checked_request(client, "http://images.example/x.png", ["images.example"])
    assert e.value.code == "image_address_not_public"
