"""Every event body has its words in one place (amoskys.bodies): the UI's summary and the hub's search text."""

from __future__ import annotations

from amoskys.bodies import BODY_TEXT, search_terms, summary_line
from amoskys.eventbus.rows import to_row
from amoskys.ui.model import summary
from amoskys.v1 import events_pb2


def test_every_body_of_event_has_words() -> None:
    bodies = {field.name for field in events_pb2.Event.DESCRIPTOR.oneofs_by_name["body"].fields}
    assert set(BODY_TEXT) == bodies


def test_the_ui_and_the_store_read_the_same_entry() -> None:
    event = events_pb2.Event(device=events_pb2.DeviceEvent(mac="AA:bb:cc:00:11:22", vendor="Acme", ips=["10.0.0.7"]))
    assert summary(event) == summary_line(event, "device") == "action_unspecified AA:bb:cc:00:11:22 10.0.0.7 Acme"
    assert to_row(event).text == search_terms(event, "device").lower()
    assert "aa:bb:cc:00:11:22" in to_row(event).text


def test_a_body_without_words_is_named_and_not_searched() -> None:
    event = events_pb2.Event(host_metrics=events_pb2.HostMetrics(cpu_percent=12.0))
    assert search_terms(event, "host_metrics") == ""
    assert summary_line(event, "none") == "none"


def test_a_port_event_names_the_sockets_user_even_without_its_process() -> None:
    Action = events_pb2.PortChange.Action
    unseen = events_pb2.ListenSocket(protocol="tcp", address="0.0.0.0", port=5432, uid=108, user="postgres")
    event = events_pb2.Event(port=events_pb2.PortChange(action=Action.OPENED, socket=unseen))
    assert summary_line(event, "port") == "opened tcp 0.0.0.0:5432 user postgres"
    assert "postgres" in to_row(event).text
    nameless = events_pb2.ListenSocket(protocol="udp6", address="::", port=53, pid=7, process="dnsmasq", uid=0)
    event.port.socket.CopyFrom(nameless)
    assert summary_line(event, "port") == "opened udp6 :::53 dnsmasq user 0"  # no name there: the uid (0 is root)
    event.port.socket.ClearField("uid")  # an older agent: no owner, no guess
    assert summary_line(event, "port") == "opened udp6 :::53 dnsmasq"
