"""The swarm monitor: `petald monitor` over a 3-server swarm of the tiny Llama (its JSON, its swarm-wide /metrics,
its block map page in Debian's headless chromium while a server is killed); public names refused by nodes and
DHT readers and shown as text; `petald status`'s block map; the pure parts of the report alone."""

from __future__ import annotations

import dataclasses
import os
import time

import httpx
import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from petald.local_swarm import local_swarm, wait_until
from petald.monitor import (
    MAX_NEW_PINGS,
    Ping,
    build_report,
    choose_pings,
    display_name,
    model_map,
    percentiles,
    reachability_hint,
)
from petald.p2p import dht
from petald.p2p.dht import InvalidRecord, ServerEntry, ServerState, merge_block_values, sign_entry
from petald.p2p.host import peer_id_of
from petald.p2p.wire import ServerInfo
from petald.status import block_bar, coverage_bar
from tests.test_metrics import scrape

FAST = ["--throughput", "100", "--heartbeat", "2", "--expiry", "6", "--port", "0"]
REFRESH = 2.0
# a name that is printable (so valid) but would be markup if a page put it in as HTML
MARKUP_NAME = "<b>bob</b> & co"
NAMES = {"0:2": "alice", "2:4": MARKUP_NAME, "4:6": ""}


@pytest.fixture(scope="module")
def watched(tiny_llama, tmp_path_factory):
    """(monitor URL, {span: server}) of a swarm of its own (a server of it gets killed) and `petald monitor`."""
    logs = tmp_path_factory.mktemp("monitor")
    with local_swarm(logs, {**os.environ, "PETAL_HOME": str(logs / "home")}) as nodes:
        bootstrap = nodes.start("dht", "--port", "0", "--new-swarm")
        servers = {
            span: nodes.start(
                "start", "--model", str(tiny_llama), "--blocks", span, "--initial-peers", bootstrap.addr,
                *FAST, *(["--public-name", name] if name else []),
            )
            for span, name in NAMES.items()
        }  # fmt: skip
        monitor = nodes.start("monitor", "--initial-peers", bootstrap.addr, "--port", "0", "--refresh", str(REFRESH))
        for server in servers.values():
            server.wait_serving()
        url = monitor.wait_for(r"block map at (http://[\d.]+:\d+)/ ").group(1)
        yield url, servers


def report(url: str) -> dict:
    return httpx.get(f"{url}/api/swarm", timeout=10).json()


def all_served(url: str) -> dict | None:
    models = report(url)["models"]
    m = models[0] if models else None
    if m and len(m["servers"]) == 3 and not m["unserved_blocks"] and all(s["reachable"] for s in m["servers"]):
        return m
    return None


def test_the_monitors_json_and_metrics_show_every_server_its_name_and_ping(watched, tiny_llama):
    url, servers = watched
    m = wait_until(lambda: all_served(url), 60, "the monitor sees 3 reachable servers")
    assert m["model"] == tiny_llama.name and m["num_blocks"] == 6
    assert m["servers_per_block"] == [1] * 6 and m["coverage"] == 1.0 and m["min_servers"] == 1
    rows = {(row["start"], row["end"]): row for row in m["servers"]}
    assert [rows[(0, 2)]["public_name"], rows[(2, 4)]["public_name"], rows[(4, 6)]["public_name"]] == [
        "alice",
        MARKUP_NAME,
        "",
    ]
    for (start, end), row in rows.items():
        assert row["peer_id"] == servers[f"{start}:{end}"].peer_id
        assert row["state"] == "ONLINE" and row["quant"] == "none" and row["version"] and row["rtt_ms"] > 0
        assert row["throughput"] == 100.0 and row["cache_tokens_left"] == 16384 and row["hint"] == ""
    samples = scrape(url)
    model = (("model", tiny_llama.name),)
    assert samples[("petal_swarm_servers", (*model, ("state", "ONLINE")))] == 3
    assert samples[("petal_swarm_unserved_blocks", model)] == 0
    assert samples[("petal_swarm_min_servers_per_block", model)] == 1
    assert samples[("petal_swarm_coverage_ratio", model)] == 1.0
    assert {name for name, _ in samples} >= {"petal_monitor_ping_seconds", "petal_swarm_servers_by_version"}


def test_the_block_map_in_chromium_turns_a_killed_servers_blocks_red(watched, browser, tmp_path):
    url, servers = watched
    wait_until(lambda: all_served(url), 60, "the monitor sees 3 reachable servers")
    browser.set_window_size(1100, 760)
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)

    def map_rows() -> list:
        return browser.find_elements(By.CSS_SELECTOR, "section.model table.map tr.server")

    def unserved() -> list[str]:
        cells = browser.find_elements(By.CSS_SELECTOR, "section.model tr.coverage td.unserved")
        return [cell.get_attribute("data-block") for cell in cells]

    wait.until(lambda b: len(map_rows()) == 3)
    assert unserved() == []
    summary = browser.find_element(By.CSS_SELECTOR, "section.model .summary")
    assert summary.get_attribute("data-unserved") == "0" and "3 servers" in summary.text
    # the markup name is text on the page, not markup
    labels = [row.find_element(By.CSS_SELECTOR, "td.label").text for row in map_rows()]
    assert MARKUP_NAME in labels and not browser.find_elements(By.CSS_SELECTOR, "section.model b")
    browser.save_screenshot(str(tmp_path / "monitor-served.png"))

    servers["2:4"].kill()
    killed = time.monotonic()
    # within one refresh of the monitor (and a ping's timeout), the page shows blocks 2 and 3 unserved
    wait.until(lambda b: unserved() == ["2", "3"])
    assert time.monotonic() - killed < 2 * REFRESH + 3 + 5, "the page was slow to mark the blocks unserved"
    assert browser.find_element(By.CSS_SELECTOR, "section.model .summary").get_attribute("data-unserved") == "2"
    shot = tmp_path / "monitor-block-map.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot of the monitor's block map: {shot}")
    dead = next(row for row in report(url)["models"][0]["servers"] if row["start"] == 2)
    if dead["state"] == "UNREACHABLE":  # until its entry expires, the DHT still lists it
        assert dead["reachable"] is False and "firewall" in dead["hint"] and dead["ping_error"]


def test_petald_start_refuses_a_public_name_with_control_characters_or_10_kB(tiny_llama, capsys):
    from petald.cli import main

    for name in ("bad\x1b[31mname", "x" * 10_000, "tab\there", " padded"):
        assert main(["start", "--model", str(tiny_llama), "--blocks", "0:2", "--new-swarm", "--public-name", name]) == 2
        assert "public name" in capsys.readouterr().err


def test_dht_readers_drop_a_validly_signed_entry_with_a_forged_long_or_unprintable_name():
    key_pair = create_new_key_pair()
    peer = str(peer_id_of(key_pair))
    now = time.time()
    entry = ServerEntry(peer, ServerState.ONLINE, 0, 2, 1.0, [], 0, "none", "0.1", updated_at=now, expires_at=now + 60)
    key = "/petal/tiny/0"
    honest = sign_entry(key, dataclasses.replace(entry, public_name="alice"), key_pair)
    for name in ("x" * 10_000, "evil\u202egnp.exe", "new\nline"):
        forged = dataclasses.replace(entry, public_name=name, public_key=key_pair.public_key.serialize())
        signature = key_pair.private_key.sign(dht._signed_bytes("petal/server-entry/v1", key, forged))
        wire = msgpack.unpackb(msgpack.packb(dataclasses.replace(forged, signature=signature).to_wire()), raw=False)
        with pytest.raises(InvalidRecord, match="public.name"):
            ServerEntry.from_wire(wire)
        other = create_new_key_pair()
        valid = sign_entry(key, dataclasses.replace(entry, peer_id=str(peer_id_of(other))), other)
        merged = merge_block_values(key, [{peer: wire}, {valid.peer_id: valid.to_wire()}], now)
        assert list(merged) == [valid.peer_id]  # the forged entry is dropped, the other kept
    assert ServerEntry.from_wire(honest.to_wire()).public_name == "alice"


# ---------------------------------------------------------------- pure parts


def entry(peer: str, start: int, end: int, state: str = "ONLINE", name: str = "") -> ServerEntry:
    addrs = [f"/ip4/10.0.0.1/tcp/31330/p2p/{peer}"]
    return ServerEntry(peer, ServerState(state), start, end, 10.0, addrs, 100, "none", "0.1", public_name=name)


def info(start: int, end: int, state: str = "ONLINE") -> ServerInfo:
    return ServerInfo("m", start, end, state, 12.0, 50, "none", "0.2")


def test_the_block_map_counts_only_servers_that_answered_online_and_keeps_unread_blocks_apart():
    entries = {"a": entry("a", 0, 4), "b": entry("b", 2, 6), "c": entry("c", 4, 8), "d": entry("d", 0, 8, "OFFLINE")}
    pings = {"a": Ping(info(0, 4), 0.004), "b": Ping(None, None, "refused"), "c": Ping(info(4, 6), 0.002)}
    m = model_map("m", 8, entries, pings, unread=[7])
    assert m.servers_per_block == [1, 1, 1, 1, 1, 1, 0, 0]  # b unreachable; c answered it serves 4:6 now
    assert m.unserved_blocks == [6] and m.unread_blocks == [7] and m.min_servers == 0 and m.coverage == 6 / 8
    rows = {row.peer_id: row for row in m.servers}
    assert (rows["b"].state, rows["b"].reachable, rows["b"].rtt_ms) == ("UNREACHABLE", False, None)
    assert rows["b"].ping_error == "refused" and "31330" in rows["b"].hint and "--public-host" in rows["b"].hint
    assert (rows["c"].end, rows["c"].version, rows["c"].rtt_ms, rows["c"].reachable) == (6, "0.2", 2.0, True)
    assert rows["d"].state == "OFFLINE" and rows["d"].reachable is None  # it left: not pinged


def test_the_report_holds_ping_percentiles_and_a_capped_escaped_name_is_the_pages_business():
    entries = {"a": entry("a", 0, 2, name="alice")}
    report = build_report({"m": (2, entries, [])}, {"a": Ping(info(0, 2), 0.01)}, now=5.0)
    assert report.models[0].servers[0].public_name == "alice" and report.ping_seconds["0.5"] == 0.01
    assert percentiles([0.4, 0.1, 0.3, 0.2]) == {"0.5": 0.2, "0.9": 0.4, "0.99": 0.4} and percentiles([]) == {}
    assert display_name("x" * 100) == "x" * 32 and display_name("a\x00b") == ""


def test_a_public_address_gets_the_firewall_hint_without_the_nat_one():
    hint = reachability_hint(["/ip4/1.2.3.4/tcp/31330/p2p/12D3KooW"])
    assert "firewall" in hint and "31330" in hint and "--public-host" not in hint


def test_one_refresh_pings_every_known_server_and_a_bounded_number_of_new_ones():
    flood = [entry(f"new{i}", 0, 1) for i in range(1000)]
    chosen = choose_pings([entry("known", 0, 1), entry("gone", 0, 1, "OFFLINE"), *flood], {"known"})
    peers = [e.peer_id for e in chosen]
    assert peers[0] == "known" and "gone" not in peers and len(peers) == 1 + MAX_NEW_PINGS


def test_petald_status_draws_one_bar_per_server_and_the_blocks_served_by_no_one():
    assert block_bar(2, 4, 6, "ONLINE") == "..##.." and block_bar(0, 2, 4, "JOINING") == "++.."
    assert coverage_bar({0: ["a"], 1: [], 2: ["a", "b"], 3: []}, unread=[3]) == "1!2?"


def test_the_monitor_page_is_served_by_petal_api_under_monitor():
    from starlette.testclient import TestClient

    from petal_client.api.app import create_app
    from petal_client.api.config import ApiConfig
    from petal_client.swarm import SwarmError

    class OfflineSwarm:  # a swarm that cannot be reached: the pages still answer, with the reason
        def run(self, *call):
            raise SwarmError("no swarm in this test")

    class ModelWithoutSwarm:
        swarm = OfflineSwarm()

    app = create_app({"m": ModelWithoutSwarm()}, ApiConfig())
    try:
        with TestClient(app) as client:
            assert "Petal swarm monitor" in client.get("/monitor").text  # redirected to /monitor/
            wait_until(lambda: client.get("/monitor/api/swarm").json()["error"], 10, "the failed read reported")
            assert "no swarm in this test" in client.get("/monitor/api/swarm").json()["error"]
    finally:
        app.state.monitor.close()
