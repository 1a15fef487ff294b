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
    new = signed_wire(a, state=ServerState.ONLINE, updated_at=NOW + 30, expires_at=NOW + 120)
    copies = [{a_id: old}, {a_id: new, b_id: signed_wire(b)}]
    for values in (copies, copies[::-1]):
        merged = merge_block_values(KEY, values, NOW)
        assert set(merged) == {a_id, b_id}
        assert merged[a_id].state == ServerState.ONLINE
        assert merged[a_id].updated_at == NOW + 30


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
    validator = PetalRecordValidator()
    validator.validate(KEY, msgpack.packb({str(peer_id_of(good)): signed_wire(good)}))
    with pytest.raises(InvalidRecord, match="bad signature"):
        validator.validate(KEY, value)
    with pytest.raises(InvalidRecord, match="not a block key"):
        validator.validate("/petal/unrelated", msgpack.packb({}))


def test_validator_select_prefers_more_live_entries_then_newer_ones() -> None:
    import time

    now = time.time()
    a, b = create_new_key_pair(), create_new_key_pair()
    a_id, b_id = str(peer_id_of(a)), str(peer_id_of(b))

    def value(**entries: dict[str, Any]) -> bytes:
        return msgpack.packb(entries)

    a_old = signed_wire(a, updated_at=now - 10, expires_at=now + 60)
    a_new = signed_wire(a, updated_at=now, expires_at=now + 60)
    b_live = signed_wire(b, updated_at=now - 20, expires_at=now + 60)
    b_dead = signed_wire(b, updated_at=now - 200, expires_at=now - 100)
    select = PetalRecordValidator().select
    assert select(KEY, [value(**{a_id: a_old}), value(**{a_id: a_old, b_id: b_live})]) == 1
    assert select(KEY, [value(**{a_id: a_old}), value(**{a_id: a_new})]) == 1
    assert select(KEY, [value(**{a_id: a_new}), value(**{a_id: a_old, b_id: b_dead})]) == 0
    # Ties keep the first value (a storing peer keeps what it has).
    assert select(KEY, [value(**{a_id: a_new}), value(**{a_id: a_new})]) == 0
    assert select(KEY, [b"garbage", value(**{a_id: a_old})]) == 1


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


def test_merge_keeps_the_newest_entries_when_a_value_would_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dht, "MAX_ENTRIES_PER_VALUE", 3)
    keys = [create_new_key_pair() for _ in range(4)]
    wires = {str(peer_id_of(k)): signed_wire(k, updated_at=NOW + i) for i, k in enumerate(keys)}
    copies = [dict(list(wires.items())[:2]), dict(list(wires.items())[2:])]
    merged = merge_block_values(KEY, copies, NOW)
    assert set(merged) == {str(peer_id_of(k)) for k in keys[1:]}
    PetalRecordValidator().validate(KEY, encode_block_value(merged))


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
