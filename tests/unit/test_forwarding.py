"""What the backend is told about the client (XCLIENT, XFORWARD) and the Received header."""

from datetime import UTC, datetime

import pytest
from portcullis.forwarding import (
    MAX_COMMAND,
    ClientFacts,
    attributes,
    choose,
    commands,
    received_header,
    xtext,
)

POSTFIX_XCLIENT = "NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
POSTFIX_XFORWARD = "NAME ADDR PROTO HELO SOURCE PORT IDENT"
CLIENT = ClientFacts("192.0.2.7", 40123, "client.example", esmtp=True)
WHEN = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("value, encoded", [
    ("client.example", "client.example"),
    ("[UNAVAILABLE]", "[UNAVAILABLE]"),
    ("a+b=c", "a+2Bb+3Dc"),  # RFC 3461 4: "+" and "=" are always encoded
    ("two words\t", "two+20words+09"),
    ("caf\u00e9", "caf+C3+A9"),  # octets outside "!".."~", of the UTF-8 form
    ("~!", "~!"),
])
def test_xtext(value, encoded):
    assert xtext(value) == encoded


def test_attributes_of_an_ipv4_client_without_a_verified_name():
    assert attributes(CLIENT) == {"NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.7", "PORT": "40123",
                                  "PROTO": "ESMTP", "HELO": "client.example"}


def test_attributes_of_an_ipv6_client_with_a_name_that_said_helo():
    client = ClientFacts("2001:DB8:0::1", 25, "mx.example", esmtp=False, name="mx.example")
    assert attributes(client) == {"NAME": "mx.example", "ADDR": "IPV6:2001:db8::1", "PORT": "25",
                                  "PROTO": "SMTP", "HELO": "mx.example"}


def test_an_ipv4_mapped_address_is_the_ipv4_address():
    assert attributes(ClientFacts("::ffff:192.0.2.7", 1, "h", True))["ADDR"] == "192.0.2.7"


def test_a_value_too_long_for_postfix_goes_as_unavailable_never_cut():
    fits = ClientFacts("192.0.2.7", 1, "h" * 255, True)
    assert attributes(fits)["HELO"] == "h" * 255
    grows = ClientFacts("192.0.2.7", 1, "+" * 86, True)  # 258 octets once encoded
    assert attributes(grows)["HELO"] == "[UNAVAILABLE]"


@pytest.mark.parametrize("mode, extensions, chosen", [
    ("auto", {"XCLIENT": POSTFIX_XCLIENT, "XFORWARD": POSTFIX_XFORWARD}, "XCLIENT"),
    ("auto", {"XFORWARD": POSTFIX_XFORWARD}, "XFORWARD"),
    ("auto", {"PIPELINING": ""}, None),
    ("auto", {"XCLIENT": "NAME HELO"}, None),  # no ADDR: nothing worth saying
    ("xforward", {"XCLIENT": POSTFIX_XCLIENT, "XFORWARD": POSTFIX_XFORWARD}, "XFORWARD"),
    ("xclient", {"XFORWARD": POSTFIX_XFORWARD}, None),
    ("off", {"XCLIENT": POSTFIX_XCLIENT, "XFORWARD": POSTFIX_XFORWARD}, None),
])
def test_choose(mode, extensions, chosen):
    assert choose(mode, extensions) == chosen


def test_commands_send_every_offered_attribute_in_one_line():
    assert commands("XFORWARD", POSTFIX_XFORWARD, CLIENT) == (
        "XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40123 PROTO=ESMTP HELO=client.example",)
    assert commands("XCLIENT", "name addr", CLIENT) == (
        "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7",)  # only what the backend offered


def test_commands_split_to_stay_within_the_command_line_limit():
    client = ClientFacts("2001:db8::1", 65535, "h" * 255, True, name="n" * 250 + ".test")
    lines = commands("XCLIENT", POSTFIX_XCLIENT, client)
    assert len(lines) == 2 and all(len(line) + 2 <= MAX_COMMAND for line in lines)
    assert all(line.startswith("XCLIENT ") for line in lines)
    words = " ".join(line.removeprefix("XCLIENT ") for line in lines).split()
    assert [word.split("=")[0] for word in words] == ["NAME", "ADDR", "PORT", "PROTO", "HELO"]


def test_received_header():
    header = received_header(CLIENT, "mx.example.org", "5f3a9c1e2b7d", WHEN)
    assert header == (b"Received: from client.example ([192.0.2.7]) by mx.example.org (Portcullis)\r\n"
                      b"\twith ESMTP id 5f3a9c1e2b7d; Tue, 01 Dec 2026 10:00:00 +0000\r\n")


def test_received_header_with_tls_a_name_and_ipv6():
    client = ClientFacts("2001:db8::1", 1, "client.example", True,
                         "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384", name="client.example")
    assert received_header(client, "mx.example.org", "5f3a9c1e2b7d", WHEN).decode() == (
        "Received: from client.example (client.example [IPv6:2001:db8::1])\r\n"
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        "\tby mx.example.org (Portcullis) with ESMTPS id 5f3a9c1e2b7d;\r\n"
        "\tTue, 01 Dec 2026 10:00:00 +0000\r\n")


def test_received_header_said_helo_and_no_session_id():
    header = received_header(ClientFacts("192.0.2.7", 1, "c.example", False), "mx", "", WHEN)
    assert b" with SMTP;\r\n\tTue, 01 Dec 2026" in header


@pytest.mark.parametrize("helo, shown", [
    ("a(b)c;d@e", "a?b?c?d?e"),  # what would break the header's syntax, as Postfix does
    ("x\x01y", "x?y"),
    (".leading.dot", ".leading.dot"),
    ("h" * 255, "h" * 255),
])
def test_received_header_is_safe_whatever_the_helo(helo, shown):
    header = received_header(ClientFacts("192.0.2.7", 1, helo, True), "mx.example.org", "id1", WHEN)
    lines = header.decode("ascii").split("\r\n")
    assert lines[0].startswith("Received: from") and lines[-1] == ""
    assert all(line.startswith("\t") for line in lines[1:-1])  # never a leading dot
    assert all(len(line) <= 78 for line in lines if shown not in line)
    assert f"from {shown} ([192.0.2.7]) by" in " ".join(header.decode().split())
