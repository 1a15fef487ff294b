"""Signed swarm records: sign/verify, wire validation, merge and the DHT validator (no network I/O)."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht import DHTMode, KadDHT

from petald.p2p import dht
from petald.p2p.dht import (
    MODEL_INDEX_KEY,
    InvalidRecord,
    ModelEntry,
    PetalRecordValidator,
    ServerEntry,
    ServerState,
    SwarmDHT,
    block_key,
    decode_block_value,
    decode_model_index,
    encode_block_value,
    encode_model_index,
    merge_block_values,
    merge_model_indexes,
    model_block_counts,
    parse_block_key,
    sign_entry,
    verify_entry,
)
from petald.p2p.host import make_host, peer_id_of

NOW = 1_800_000_000.0
KEY = "/petal/smollm2-135m/3"


def make_entry(key_pair: KeyPair, **changes: Any) -> ServerEntry:
    entry = ServerEntry(
        peer_id=str(peer_id_of(key_pair)),
        state=ServerState.ONLINE,
        start=0,
        end=10,
        throughput=123.5,
        addrs=["/ip4/127.0.0.1/tcp/4001/p2p/" + str(peer_id_of(key_pair))],
        cache_tokens_left=8192,
        quant="none",
        version="0.1.0",
        adapters=["lora-a"],
        updated_at=NOW,
        expires_at=NOW + 90,
    )
    return dataclasses.replace(entry, **changes)


def signed_wire(key_pair: KeyPair, key: str = KEY, **changes: Any) -> dict[str, Any]:
    """A signed entry as it comes off the wire (through msgpack)."""
    entry = sign_entry(key, make_entry(key_pair, **changes), key_pair)
    return msgpack.unpackb(msgpack.packb(entry.to_wire(), use_bin_type=True), raw=False)


def test_signed_entry_verifies_after_a_wire_round_trip() -> None:
    key_pair = create_new_key_pair()
    entry = ServerEntry.from_wire(signed_wire(key_pair))
    verify_entry(KEY, entry)
    assert entry == sign_entry(KEY, make_entry(key_pair), key_pair)
    assert decode_block_value(KEY, encode_block_value({entry.peer_id: entry})) == {entry.peer_id: entry}


@pytest.mark.parametrize(
    "field, value",
    [
        ("state", "OFFLINE"),
        ("end", 11),
        ("throughput", 1e6),
        ("addrs", ["/ip4/10.0.0.1/tcp/1"]),
        ("cache_tokens_left", 1 << 30),
        ("expires_at", NOW + 3000),
        ("adapters", []),
    ],
)
def test_tampered_field_is_rejected(field: str, value: object) -> None:
    wire = signed_wire(create_new_key_pair())
    wire[field] = value
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_entry(KEY, ServerEntry.from_wire(wire))


def test_entry_replayed_under_another_key_is_rejected() -> None:
    entry = ServerEntry.from_wire(signed_wire(create_new_key_pair()))
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_entry("/petal/smollm2-135m/4", entry)
    with pytest.raises(InvalidRecord, match="bad signature"):
        verify_entry("/petal/other-model/3", entry)


def test_entry_outside_its_span_is_rejected() -> None:
    key_pair = create_new_key_pair()
    key = block_key("smollm2-135m", 12)
    entry = ServerEntry.from_wire(signed_wire(key_pair, key=key))
    with pytest.raises(InvalidRecord, match="spans"):
        verify_entry(key, entry)


def test_entry_claiming_another_peers_id_is_rejected() -> None:
    victim, forger = create_new_key_pair(), create_new_key_pair()
    # The forger signs an entry in the victim's name with its own key (sign_entry refuses this).
    forged = dataclasses.replace(make_entry(victim), public_key=forger.public_key.serialize())
    payload_owner = dataclasses.replace(forged, peer_id=str(peer_id_of(forger)))
    signature = sign_entry(KEY, payload_owner, forger).signature
    with pytest.raises(InvalidRecord, match="another peer's key"):
        verify_entry(KEY, dataclasses.replace(forged, signature=signature))
    with pytest.raises(ValueError, match="claims peer"):
        sign_entry(KEY, make_entry(victim), forger)


def test_entry_with_a_swapped_public_key_is_rejected() -> None:
    owner, other = create_new_key_pair(), create_new_key_pair()
    wire = signed_wire(owner)
    wire["public_key"] = other.public_key.serialize()
    with pytest.raises(InvalidRecord, match="another peer's key"):
        verify_entry(KEY, ServerEntry.from_wire(wire))


def test_merge_drops_expired_entries() -> None:
    fresh, stale = create_new_key_pair(), create_new_key_pair()
    value = {
        str(peer_id_of(fresh)): signed_wire(fresh),
        str(peer_id_of(stale)): signed_wire(stale, updated_at=NOW - 100, expires_at=NOW - 10),
    }
    assert set(merge_block_values(KEY, [value], NOW)) == {str(peer_id_of(fresh))}
    assert merge_block_values(KEY, [value], NOW + 90) == {}


def test_merge_keeps_newest_entry_per_peer_and_the_union_of_peers() -> None:
    a, b = create_new_key_pair(), create_new_key_pair()
    a_id, b_id = str(peer_id_of(a)), str(peer_id_of(b))
    old = signed_wire(a, state=ServerState.JOINING)
    new = signed_wire(a, state=ServerState.ONLINE, updated_at=NOW + 10, expires_at=NOW + 100)
    copies = [{a_id: old}, {a_id: new, b_id: signed_wire(b)}]
    for values in (copies, copies[::-1]):
        merged = merge_block_values(KEY, values, NOW)
        assert set(merged) == {a_id, b_id}
        assert merged[a_id].state == ServerState.ONLINE
        assert merged[a_id].updated_at == NOW + 10


def test_merge_drops_invalid_entries_and_copies_but_keeps_valid_ones() -> None:
    good, bad, misfiled = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    tampered = signed_wire(bad)
    tampered["throughput"] = 1e9
    value = {
        str(peer_id_of(good)): signed_wire(good),
        str(peer_id_of(bad)): tampered,
        "not-the-owner": signed_wire(misfiled),
        str(peer_id_of(misfiled)): {"peer_id": 1},
    }
    merged = merge_block_values(KEY, [value, ["not", "a", "map"], {}], NOW)  # type: ignore[list-item]
    assert set(merged) == {str(peer_id_of(good))}


def valid_wire() -> dict[str, Any]:
    return signed_wire(create_new_key_pair())


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda w: w.pop("quant"), "missing quant; unexpected none"),
        (lambda w: w.update(extra=1), "missing none; unexpected 'extra'"),
        (lambda w: w.update(start="0"), "start is str, not an int"),
        (lambda w: w.update(start=True), "start is bool, not an int"),
        (lambda w: w.update(start=-1), "start=-1 is outside"),
        (lambda w: w.update(start=10), "span \\[10, 10\\) is empty"),
        (lambda w: w.update(end=10**9), "end=1000000000 is outside"),
        (lambda w: w.update(throughput=float("nan")), "throughput=nan is not a finite number"),
        (lambda w: w.update(throughput=-1.0), "throughput=-1.0 is not a finite number"),
        (lambda w: w.update(state="DANCING"), "state 'DANCING' is not one of"),
        (lambda w: w.update(quant="fp4"), "quant 'fp4' is not one of"),
        (lambda w: w.update(version="v" * 33), "version is 33 characters long"),
        (lambda w: w.update(addrs=["/ip4/1.2.3.4/tcp/1"] * 17), "addrs has 17 items"),
        (lambda w: w.update(addrs="/ip4/1.2.3.4/tcp/1"), "addrs is str, not a list"),
        (lambda w: w.update(addrs=[7]), "addrs is int, not a string"),
        (lambda w: w.update(adapters=["x" * 129]), "adapters is 129 characters long"),
        (lambda w: w.update(peer_id="not a peer id"), "is not a base58 peer id"),
        (lambda w: w.update(direct_peers=["not a peer id"]), "direct_peers holds 'not a peer id', not a base58"),
        (lambda w: w.update(direct_peers=[w["peer_id"]] * 33), "direct_peers has 33 items"),
        (lambda w: w.update(public_key="text"), "public_key is str, not bytes"),
        (lambda w: w.update(signature=b"s" * 129), "signature is 129 bytes long"),
        (lambda w: w.update(expires_at=w["updated_at"] + 7200), "lifetime 7200 s is outside"),
        (lambda w: w.update(expires_at=w["updated_at"]), "lifetime 0 s is outside"),
    ],
)
def test_malformed_entry_raises_invalid_record_with_a_reason(mutate: Any, reason: str) -> None:
    wire = valid_wire()
    mutate(wire)
    with pytest.raises(InvalidRecord, match=reason):
        ServerEntry.from_wire(wire)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "is list, not a map"),
        (msgpack.packb({"peer": "entry"}), "server entry is str, not a map"),
        (msgpack.packb({1: {}}), "not valid msgpack"),
    ],
)
def test_malformed_block_value_raises_invalid_record(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidRecord, match=reason):
        decode_block_value(KEY, data)


def test_unpublishable_keys_and_model_names_are_rejected() -> None:
    assert parse_block_key(block_key("HuggingFaceTB/SmolLM2-135M", 29)) == ("HuggingFaceTB/SmolLM2-135M", 29)
    for model in ["", "_models", "a/b/c", "../x", "a b", "x" * 97]:
        with pytest.raises(InvalidRecord, match="model name"):
            block_key(model, 0)
    for key in ["/petal/m/-1", "/petal/m/01", "/petal/m/x", "/other/m/1", "/petal/m/99999", "/petal/m/"]:
        with pytest.raises(InvalidRecord):
            parse_block_key(key)


def test_validator_rejects_a_value_with_one_bad_entry() -> None:
    good, bad = create_new_key_pair(), create_new_key_pair()
    tampered = signed_wire(bad)
    tampered["end"] = 20
    value = msgpack.packb({str(peer_id_of(good)): signed_wire(good), str(peer_id_of(bad)): tampered})
    validator = PetalRecordValidator(clock=lambda: NOW)
    validator.validate(KEY, msgpack.packb({str(peer_id_of(good)): signed_wire(good)}))
    with pytest.raises(InvalidRecord, match="bad signature"):
        validator.validate(KEY, value)
    with pytest.raises(InvalidRecord, match="not a block key"):
        validator.validate("/petal/unrelated", msgpack.packb({}))


def block_value(*wires: dict[str, Any]) -> bytes:
    return msgpack.packb({w["peer_id"]: w for w in wires})


def test_validator_select_keeps_the_stored_value_unless_the_new_one_supersedes_it() -> None:
    a, b, c = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    a_old = signed_wire(a, updated_at=NOW - 10, expires_at=NOW + 60)
    a_new = signed_wire(a, updated_at=NOW, expires_at=NOW + 60)
    b_live = signed_wire(b, updated_at=NOW - 20, expires_at=NOW + 60)
    b_dead = signed_wire(b, updated_at=NOW - 200, expires_at=NOW - 100)
    c_live = signed_wire(c)
    select = PetalRecordValidator(clock=lambda: NOW).select
    assert select(KEY, [block_value(a_old), block_value(a_old, b_live)]) == 1  # an entry added
    assert select(KEY, [block_value(a_old, b_live), block_value(a_new, b_live)]) == 1  # an entry refreshed
    assert select(KEY, [block_value(a_old, b_dead), block_value(a_new)]) == 1  # an expired one dropped
    # A value that drops or dates back a live entry of the stored one is refused, whatever it adds.
    assert select(KEY, [block_value(a_old, b_live), block_value(a_new, c_live)]) == 0
    assert select(KEY, [block_value(a_new), block_value(a_old, b_live)]) == 0
    # Nothing new: the stored value stays (py-libp2p asks select(key, [stored, received])).
    assert select(KEY, [block_value(a_new), block_value(a_new)]) == 0
    assert select(KEY, [block_value(a_new, b_live), block_value(b_live)]) == 0
    assert select(KEY, [b"garbage", block_value(a_old)]) == 1
    assert select(KEY, [block_value(a_old), b"garbage"]) == 0


def test_validator_refuses_entries_dated_ahead_of_its_clock_by_more_than_the_skew() -> None:
    key_pair = create_new_key_pair()
    value = block_value(signed_wire(key_pair, updated_at=NOW + 20, expires_at=NOW + 110))
    PetalRecordValidator(clock=lambda: NOW).validate(KEY, value)
    with pytest.raises(InvalidRecord, match="dated over 30 s ahead"):
        PetalRecordValidator(clock=lambda: NOW - 11).validate(KEY, value)
    future_index = encode_model_index(
        {
            "llama": {
                str(peer_id_of(key_pair)): index_entry(
                    key_pair, "llama", 8, updated_at=NOW + 3e8, expires_at=NOW + 3e8 + 60
                )
            }
        }
    )
    with pytest.raises(InvalidRecord, match="ahead"):
        PetalRecordValidator(clock=lambda: NOW).validate(MODEL_INDEX_KEY, future_index)


def index_entry(key_pair: KeyPair, model: str, num_blocks: int, **changes: Any) -> ModelEntry:
    entry = ModelEntry(
        model=model,
        num_blocks=num_blocks,
        peer_id=str(peer_id_of(key_pair)),
        updated_at=NOW,
        expires_at=NOW + 90,
    )
    return sign_entry(MODEL_INDEX_KEY, dataclasses.replace(entry, **changes), key_pair)


def test_model_index_merges_copies_and_counts_blocks_by_majority() -> None:
    a, b, c = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    ids = [str(peer_id_of(k)) for k in (a, b, c)]
    copy_1 = {"llama": {ids[0]: index_entry(a, "llama", 32)}, "bloom": {ids[2]: index_entry(c, "bloom", 24)}}
    copy_2 = {
        "llama": {ids[1]: index_entry(b, "llama", 32), ids[2]: index_entry(c, "llama", 30)},
        "gone": {ids[0]: index_entry(a, "gone", 8, updated_at=NOW - 100, expires_at=NOW - 1)},
    }
    values = [msgpack.unpackb(encode_model_index(copy), raw=False) for copy in (copy_1, copy_2)]
    index = merge_model_indexes(values, NOW)
    assert decode_model_index(encode_model_index(index)) == index
    assert {m: sorted(peers) for m, peers in index.items()} == {
        "llama": sorted(ids),
        "bloom": [ids[2]],
    }
    assert model_block_counts(index) == {"bloom": 24, "llama": 32}


def test_model_index_rejects_an_entry_filed_under_another_model() -> None:
    a = create_new_key_pair()
    data = encode_model_index({"llama": {str(peer_id_of(a)): index_entry(a, "bloom", 24)}})
    with pytest.raises(InvalidRecord, match="another model"):
        decode_model_index(data)
    assert merge_model_indexes([msgpack.unpackb(data, raw=False)], NOW) == {}


def sybils(count: int, **changes: Any) -> dict[str, dict[str, Any]]:
    """A flood: ``count`` validly signed entries from throw-away keys, as a copy (peer_id -> wire)."""
    wires = [signed_wire(create_new_key_pair(), **changes) for _ in range(count)]
    return {w["peer_id"]: w for w in wires}


# Dated as late as readers keep, living as long as an entry may: the best a flood can do.
FLOOD = dict(updated_at=NOW + 14, expires_at=NOW + 14 + dht.MAX_ENTRY_TTL_S)


def test_merge_drops_entries_dated_ahead_of_the_readers_clock() -> None:
    now, ahead = create_new_key_pair(), create_new_key_pair()
    value = {
        str(peer_id_of(now)): signed_wire(now, updated_at=NOW + 15, expires_at=NOW + 105),
        str(peer_id_of(ahead)): signed_wire(ahead, updated_at=NOW + 16, expires_at=NOW + 106),
    }
    merged = merge_block_values(KEY, [value], NOW)
    assert set(merged) == {str(peer_id_of(now))}
    assert len(merge_block_values(KEY, [value], NOW + 1)) == 2
    # what a writer merged is valid at a peer whose clock is up to half the skew behind the writer's
    PetalRecordValidator(clock=lambda: NOW - dht.MAX_CLOCK_SKEW_S / 2).validate(KEY, encode_block_value(merged))


def test_a_flood_of_throwaway_keys_cannot_replace_the_servers_a_peer_stores() -> None:
    a, b = create_new_key_pair(), create_new_key_pair()
    stored = {str(peer_id_of(k)): signed_wire(k) for k in (a, b)}
    validator = PetalRecordValidator(clock=lambda: NOW)
    ten_years = 10 * 365 * 86400
    with pytest.raises(InvalidRecord, match="ahead"):
        validator.validate(KEY, msgpack.packb(sybils(4, updated_at=NOW + ten_years, expires_at=NOW + ten_years + 90)))
    flood = msgpack.packb(sybils(dht.MAX_ENTRIES_PER_VALUE, **FLOOD))
    validator.validate(KEY, flood)  # well-formed and signed: only select can refuse it
    assert validator.select(KEY, [msgpack.packb(stored), flood]) == 0
    # Beside the servers, a flood may take the room left; the servers stay.
    padded = msgpack.packb({**stored, **sybils(dht.MAX_ENTRIES_PER_VALUE - 2, **FLOOD)})
    assert validator.select(KEY, [msgpack.packb(stored), padded]) == 1
    assert set(stored) <= set(decode_block_value(KEY, padded))


def test_a_heartbeat_after_a_flood_writes_a_value_with_the_server_that_the_stores_accept() -> None:
    a, b = create_new_key_pair(), create_new_key_pair()
    a_id, b_id = str(peer_id_of(a)), str(peer_id_of(b))
    stored = {a_id: signed_wire(a), b_id: signed_wire(b)}
    flooded = sybils(dht.MAX_ENTRIES_PER_VALUE, **FLOOD)  # taken by a peer that held no servers
    now = NOW + 30
    own = {a_id: signed_wire(a, updated_at=now, expires_at=now + 90)}
    # SwarmDHT.announce: read every copy, merge with the fresh entry, encode, store at the same peers.
    written = encode_block_value(merge_block_values(KEY, [flooded, stored, own], now))
    entries = decode_block_value(KEY, written)
    assert len(entries) == dht.MAX_ENTRIES_PER_VALUE
    assert entries[a_id].updated_at == now and b_id in entries
    validator = PetalRecordValidator(clock=lambda: now)
    validator.validate(KEY, written)
    assert validator.select(KEY, [msgpack.packb(stored), written]) == 1
    # A reader sees every live entry of every copy, the flood's and the servers'.
    read = merge_block_values(KEY, [flooded, msgpack.unpackb(written)], now)
    assert {a_id, b_id} <= set(read) and len(read) == dht.MAX_ENTRIES_PER_VALUE + 2


def test_merge_orders_entries_by_turns_of_the_copies_so_no_copy_takes_more_than_its_share() -> None:
    a, b, c = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    a_id, b_id, c_id = (str(peer_id_of(k)) for k in (a, b, c))
    flood = sybils(3, **FLOOD)
    leaving = {b_id: signed_wire(b, state=ServerState.OFFLINE, updated_at=NOW + 5, expires_at=NOW + 95)}
    honest = {a_id: signed_wire(a), **leaving, c_id: signed_wire(c, updated_at=NOW - 5, expires_at=NOW + 85)}
    order = list(merge_block_values(KEY, [flood, honest], NOW))
    # Turns: each copy's best entry, then each copy's second...; in a copy serving before OFFLINE, then newest.
    assert order[1::2] == [a_id, c_id, b_id] and set(order[0::2]) == set(flood)
    many = sybils(dht.MAX_ENTRIES_PER_VALUE)
    assert a_id in decode_block_value(
        KEY, encode_block_value(merge_block_values(KEY, [many, {a_id: honest[a_id]}], NOW))
    )


def test_model_index_stores_every_model_a_turn_when_it_overflows() -> None:
    a = create_new_key_pair()
    flood = {}
    for _ in range(dht.MAX_ENTRIES_PER_VALUE):
        key_pair = create_new_key_pair()
        flood[str(peer_id_of(key_pair))] = index_entry(key_pair, "fake", 4, **FLOOD)
    index = merge_model_indexes(
        [
            msgpack.unpackb(encode_model_index({"fake": flood})),
            {"llama": {str(peer_id_of(a)): index_entry(a, "llama", 32).to_wire()}},
        ],
        NOW,
    )
    stored = decode_model_index(encode_model_index(index))
    assert sum(map(len, stored.values())) == dht.MAX_ENTRIES_PER_VALUE
    assert set(stored["llama"]) == {str(peer_id_of(a))}


def test_unreachable_is_never_announced() -> None:
    key_pair = create_new_key_pair()
    with pytest.raises(InvalidRecord, match="state 'UNREACHABLE' is not one of"):
        sign_entry(KEY, make_entry(key_pair, state=ServerState.UNREACHABLE), key_pair)
    wire = signed_wire(key_pair)
    wire["state"] = "UNREACHABLE"
    with pytest.raises(InvalidRecord, match="is not one of"):
        ServerEntry.from_wire(wire)
    assert ServerState.UNREACHABLE not in dht.ANNOUNCED_STATES


def test_sign_entry_refuses_an_entry_readers_would_reject() -> None:
    key_pair = create_new_key_pair()
    with pytest.raises(InvalidRecord, match="cache_tokens_left is float"):
        sign_entry(KEY, make_entry(key_pair, cache_tokens_left=1.5), key_pair)
    with pytest.raises(InvalidRecord, match="lifetime"):
        sign_entry(KEY, make_entry(key_pair, expires_at=NOW + 7200), key_pair)


def test_announce_rejects_a_bad_entry_before_any_network_traffic() -> None:
    key_pair = create_new_key_pair()
    swarm = SwarmDHT(KadDHT(make_host(key_pair), DHTMode.SERVER))

    async def announce(entry: ServerEntry, **kwargs: Any) -> None:
        await swarm.announce("smollm2-135m", entry, key_pair, **{"num_blocks": 30, **kwargs})

    with pytest.raises(InvalidRecord, match="lifetime"):
        trio.run(partial(announce, make_entry(key_pair), ttl=7200))
    with pytest.raises(ValueError, match="claims peer"):
        trio.run(announce, make_entry(create_new_key_pair()))
    with pytest.raises(ValueError, match="exceeds the model's 8 blocks"):
        trio.run(partial(announce, make_entry(key_pair), num_blocks=8))
