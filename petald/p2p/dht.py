"""Swarm state in the Kademlia DHT: signed server entries per block, merged, expired on read.

Keys and values
- ``/petal/<model>/<block>``: msgpack map ``peer_id -> ServerEntry`` (wire dict), one entry per
  server whose span covers the block.
- ``/petal/_models`` (the model index): msgpack map ``model -> {peer_id -> ModelEntry}``, so
  ``petald status`` can list served models and their block counts.
Every entry is signed by its server's libp2p key over ``(dht key, every field but the signature)``
and carries the public key; an entry verifies only if the signature holds AND the public key
hashes to the entry's peer id, so nobody can write an entry in another peer's name, or replay one
under another key. Entries carry ``updated_at`` (signing time) and ``expires_at``; readers drop
expired entries (py-libp2p's own record TTL is a fixed 24 h, so expiry is ours), and entries dated
ahead of their clock (more than MAX_CLOCK_SKEW_S / 2; a PUT with one dated more than MAX_CLOCK_SKEW_S
ahead is refused); no entry lives longer than MAX_ENTRY_TTL_S.

Kademlia keeps ONE value per key, so writers read-modify-write: read every copy from the key's
closest peers, merge (union; per peer the newest entry; expired, future-dated and invalid
dropped), add their fresh entry, store the result back to the same peers. Lost races are repaired
by the next heartbeat (every ~30 s, entries live ~90 s): each announce re-reads and re-merges.

Flooding. Anyone can make validly signed entries from throw-away keys, with any timestamps within
the bounds above; so no timestamp decides who stays. A storing peer keeps its copy unless a PUT
supersedes it (``PetalRecordValidator.select``): the PUT keeps every live entry of that copy and
adds or refreshes some. A flood cannot push out the servers a peer stores; it can only sit beside
them, up to MAX_ENTRIES_PER_VALUE. A merge orders entries by turns of the copies
(``_union_by_turns``): readers see every live entry of every copy, and a stored value keeps the
first MAX_ENTRIES_PER_VALUE, so each copy, and a writer's own fresh entry, gets its share
whatever another copy holds. A heartbeat reads the copies it writes back to and adds its fresh
entry, so it supersedes each of them (unless their union overflows: see docs/ARCHITECTURE.md).

What py-libp2p 0.8.1's KadDHT offers (read from its source):
- ``KadDHT.get_value`` returns the local copy if there is one, without asking the network, and
  otherwise the single best value chosen by ``select``: it never merges copies.
- ``KadDHT.put_value`` runs its own lookup for the closest peers, then stores at each of them.
- ``kad.peer_routing.find_closest_peers_network(key_bytes)`` (public): an iterative FIND_NODE
  lookup; up to 20 peer ids sorted by XOR distance to sha256(key). Used once, by ``bootstrap``.
- ``kad.value_store._get_from_peer(peer, key, return_record=True, return_closer_peers=True)`` and
  ``kad.value_store._store_at_peer(peer, key, value)``: one GET_VALUE / PUT_VALUE exchange with
  one peer; GET_VALUE answers with the peer's copy AND the peers it knows closer to the key.
  They are underscore-private; libp2p is pinned to 0.8.1 and only ``SwarmDHT._copy_from_peer`` /
  ``SwarmDHT._store_at_peer`` call them, so a version bump touches two lines.
- ``kad.value_store.get/put(key_bytes)`` (public): this node's own copy. KadDHT republishes
  locally put copies (first ~10 min after start, then every 22 h); harmless, as stale entries
  lose ``select`` and readers drop them.
- ``kad.routing_table.find_local_closest_peers(key_bytes, n)`` (public): the lookup's start.
So a read (``SwarmDHT._read``) is an iterative lookup whose every query is a GET_VALUE: from the
routing table's closest peers, ask each for its copy and closer peers, until the ``REPLICAS``
closest peers known have all answered; then merge their copies with the local one. A write
stores the merged value at those same peers: two exchanges per peer and key, no separate
FIND_NODE round. Keys run concurrently (``PARALLEL_KEYS``); a peer that fails a request is left
out for ``UNRESPONSIVE_S``, so a hung peer costs one ``REQUEST_TIMEOUT_S``, not one per key.
Measured on 2 cores with 4-5 node processes on 127.0.0.1: announcing 30 blocks takes 0.4-2 s,
reading 30 blocks 0.3-1.1 s, and 3.2 s while one peer hangs.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from petald.p2p.host import peer_id_of, unwrapped_groups

logger = logging.getLogger(__name__)

NAMESPACE = "petal"
MODEL_INDEX_KEY = f"/{NAMESPACE}/_models"
ENTRY_TTL_S = 90.0
MAX_ENTRY_TTL_S = 3600.0
# How far ahead of a storing peer's clock a PUT's entries may be dated (honest clocks differ a little).
# Readers and writers keep entries dated at most half that ahead, so a value a writer merged is valid
# at every peer whose clock is at most MAX_CLOCK_SKEW_S / 2 behind the writer's.
MAX_CLOCK_SKEW_S = 30.0
# The quantizations a server may run and announce: the one list config, span and wire import.
QUANTS = ("none", "int8", "nf4")

# How many of a key's closest peers are read from and written to.
REPLICAS = 8
# At most this many keys are looked up at once (bounds open streams; lookups are CPU-bound).
PARALLEL_KEYS = 8
LOOKUP_TIMEOUT_S = 10.0
LOOKUP_ROUNDS = 8
REQUEST_TIMEOUT_S = 3.0
# A peer that failed a request is left out of reads and writes for this long.
UNRESPONSIVE_S = 60.0
CONNECT_TIMEOUT_S = 5.0

MAX_MODEL_NAME_LEN = 96
MAX_BLOCKS = 10_000
MAX_ENTRIES_PER_VALUE = 512
MAX_PEER_ID_LEN = 64
MAX_ADDRS = 16
REACHABILITIES = ("unknown", "public", "private", "relayed")
MAX_DIRECT_PEERS = 32
MAX_ADDR_LEN = 256
MAX_ADAPTERS = 32
MAX_ADAPTER_LEN = 128
MAX_VERSION_LEN = 32
MAX_PUBLIC_NAME_LEN = 32
MAX_KEY_BYTES_LEN = 128
MAX_SIGNATURE_LEN = 128
MAX_THROUGHPUT = 1e9
MAX_CACHE_TOKENS = 1 << 40
MAX_WEIGHT_BYTES = 1 << 50

# A model name: Hugging Face style (``org/name``), no leading underscore (``_models`` is ours).
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_ENTRY_DOMAIN = "petal/server-entry/v1"
_MODEL_DOMAIN = "petal/model-entry/v1"


class InvalidRecord(ValueError):
    """A DHT key, value or entry is malformed, badly signed or signed for someone else."""


class ServerState(enum.StrEnum):
    """JOINING: loading its blocks (others avoid the span); ONLINE: serving; OFFLINE: leaving.

    UNREACHABLE is the client's own word for a server that did not answer a ping: never announced."""

    JOINING = "JOINING"
    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"
    UNREACHABLE = "UNREACHABLE"


# The states a server may announce (in the DHT) or report (in ServerInfo).
ANNOUNCED_STATES = (ServerState.JOINING, ServerState.ONLINE, ServerState.OFFLINE)


@dataclass(frozen=True)
class ServerEntry:
    """One server's announcement for its span of blocks [start, end) of one model."""

    peer_id: str
    state: ServerState
    start: int
    end: int
    throughput: float
    addrs: list[str]
    cache_tokens_left: int
    quant: str
    version: str
    adapters: list[str] = field(default_factory=list)
    public_name: str = ""  # a short display name its operator chose (check_public_name); "" for none
    # how peers reach it: "public" (dialled back), "relayed" (behind NAT, through the relays in addrs), "unknown"
    reachability: str = "unknown"
    # behind NAT: the peers it first reached through a relay and now reaches directly (hole punched)
    direct_peers: list[str] = field(default_factory=list)
    weight_bytes: int = 0  # the memory its blocks' weights take, as quantized (0: not known yet)
    updated_at: float = 0.0
    expires_at: float = 0.0
    public_key: bytes = b""
    signature: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        """A plain msgpack-able dict."""
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "state": ServerState(self.state).value,
            "throughput": float(self.throughput),
            "updated_at": float(self.updated_at),
            "expires_at": float(self.expires_at),
        }

    @classmethod
    def from_wire(cls, obj: object) -> ServerEntry:
        """Parse and shape-check a wire dict; raises InvalidRecord. Does not verify the signature."""
        d = _exact_dict(obj, cls, "server entry")
        start = _int(d, "start", 0, MAX_BLOCKS - 1)
        end = _int(d, "end", 1, MAX_BLOCKS)
        if end <= start:
            raise InvalidRecord(f"server entry span [{start}, {end}) is empty")
        state = _str(d, "state", 16)
        if state not in ANNOUNCED_STATES:
            raise InvalidRecord(f"server entry state {state!r} is not one of {[str(s) for s in ANNOUNCED_STATES]}")
        quant = _str(d, "quant", 8)
        if quant not in QUANTS:
            raise InvalidRecord(f"server entry quant {quant!r} is not one of {QUANTS}")
        reachability = _str(d, "reachability", 16)
        if reachability not in REACHABILITIES:
            raise InvalidRecord(f"server entry reachability {reachability!r} is not one of {REACHABILITIES}")
        entry = cls(
            peer_id=_peer_id(d),
            state=ServerState(state),
            start=start,
            end=end,
            throughput=_float(d, "throughput", 0.0, MAX_THROUGHPUT),
            addrs=_str_list(d, "addrs", MAX_ADDRS, MAX_ADDR_LEN),
            cache_tokens_left=_int(d, "cache_tokens_left", 0, MAX_CACHE_TOKENS),
            quant=quant,
            version=_str(d, "version", MAX_VERSION_LEN),
            adapters=_str_list(d, "adapters", MAX_ADAPTERS, MAX_ADAPTER_LEN),
            public_name=check_public_name(_str(d, "public_name", MAX_PUBLIC_NAME_LEN)),
            reachability=reachability,
            direct_peers=_peer_ids(d, "direct_peers", MAX_DIRECT_PEERS),
            weight_bytes=_int(d, "weight_bytes", 0, MAX_WEIGHT_BYTES),
            updated_at=_float(d, "updated_at", 0.0, math.inf),
            expires_at=_float(d, "expires_at", 0.0, math.inf),
            public_key=_bytes(d, "public_key", MAX_KEY_BYTES_LEN),
            signature=_bytes(d, "signature", MAX_SIGNATURE_LEN),
        )
        _check_times(entry)
        return entry


@dataclass(frozen=True)
class ModelEntry:
    """One server's statement that ``model`` exists with ``num_blocks`` blocks (the model index)."""

    model: str
    num_blocks: int
    peer_id: str
    updated_at: float = 0.0
    expires_at: float = 0.0
    public_key: bytes = b""
    signature: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        """A plain msgpack-able dict."""
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "updated_at": float(self.updated_at),
            "expires_at": float(self.expires_at),
        }

    @classmethod
    def from_wire(cls, obj: object) -> ModelEntry:
        """Parse and shape-check a wire dict; raises InvalidRecord. Does not verify the signature."""
        d = _exact_dict(obj, cls, "model entry")
        entry = cls(
            model=check_model_name(_str(d, "model", MAX_MODEL_NAME_LEN)),
            num_blocks=_int(d, "num_blocks", 1, MAX_BLOCKS),
            peer_id=_peer_id(d),
            updated_at=_float(d, "updated_at", 0.0, math.inf),
            expires_at=_float(d, "expires_at", 0.0, math.inf),
            public_key=_bytes(d, "public_key", MAX_KEY_BYTES_LEN),
            signature=_bytes(d, "signature", MAX_SIGNATURE_LEN),
        )
        _check_times(entry)
        return entry


Entry = TypeVar("Entry", ServerEntry, ModelEntry)
K = TypeVar("K", bound=Hashable)
S = TypeVar("S", str, bytes)
T = TypeVar("T")
R = TypeVar("R")


# ---- field checks (every failure is an InvalidRecord with the field's name) ----


def _exact_dict(obj: object, cls: type, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidRecord(f"{what} is {type(obj).__name__}, not a map")
    expected = {f.name for f in dataclasses.fields(cls)}
    if set(obj) != expected:
        missing = ", ".join(sorted(expected - set(obj))) or "none"
        extra = ", ".join(sorted(map(repr, set(obj) - expected))) or "none"
        raise InvalidRecord(f"{what} fields differ: missing {missing}; unexpected {extra}")
    return obj


def _int(d: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = d[name]
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidRecord(f"{name} is {type(v).__name__}, not an int")
    if not lo <= v <= hi:
        raise InvalidRecord(f"{name}={v} is outside [{lo}, {hi}]")
    return v


def _float(d: dict[str, Any], name: str, lo: float, hi: float) -> float:
    v = d[name]
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise InvalidRecord(f"{name} is {type(v).__name__}, not a number")
    v = float(v)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise InvalidRecord(f"{name}={v} is not a finite number in [{lo}, {hi}]")
    return v


def _str(d: dict[str, Any], name: str, max_len: int) -> str:
    return _sized(d, name, str, max_len)


def _bytes(d: dict[str, Any], name: str, max_len: int) -> bytes:
    return _sized(d, name, bytes, max_len)


def _sized(d: dict[str, Any], name: str, kind: type[S], max_len: int) -> S:
    v = d[name]
    what, unit = ("a string", "characters") if kind is str else ("bytes", "bytes")
    if not isinstance(v, kind):
        raise InvalidRecord(f"{name} is {type(v).__name__}, not {what}")
    if len(v) > max_len:
        raise InvalidRecord(f"{name} is {len(v)} {unit} long, more than {max_len}")
    return v


def _str_list(d: dict[str, Any], name: str, max_items: int, max_len: int) -> list[str]:
    v = d[name]
    if not isinstance(v, list):
        raise InvalidRecord(f"{name} is {type(v).__name__}, not a list")
    if len(v) > max_items:
        raise InvalidRecord(f"{name} has {len(v)} items, more than {max_items}")
    return [_str({name: item}, name, max_len) for item in v]


def _peer_id(d: dict[str, Any]) -> str:
    peer_id = _str(d, "peer_id", MAX_PEER_ID_LEN)
    try:
        ID.from_base58(peer_id)
    except Exception:
        raise InvalidRecord(f"peer_id {peer_id!r} is not a base58 peer id") from None
    return peer_id


def _peer_ids(d: dict[str, Any], name: str, max_items: int) -> list[str]:
    peer_ids = _str_list(d, name, max_items, MAX_PEER_ID_LEN)
    for peer_id in peer_ids:
        try:
            ID.from_base58(peer_id)
        except Exception:
            raise InvalidRecord(f"{name} holds {peer_id!r}, not a base58 peer id") from None
    return peer_ids


def _check_times(entry: ServerEntry | ModelEntry) -> None:
    ttl = entry.expires_at - entry.updated_at
    if not 0 < ttl <= MAX_ENTRY_TTL_S:
        raise InvalidRecord(f"entry lifetime {ttl:.0f} s is outside (0, {MAX_ENTRY_TTL_S:.0f}] s")


def check_model_name(model: str) -> str:
    """``model`` if it is a valid model name for DHT keys; raises InvalidRecord otherwise."""
    if len(model) > MAX_MODEL_NAME_LEN or not _MODEL_NAME.fullmatch(model):
        raise InvalidRecord(
            f"model name {model!r} must be letters, digits, '.', '_', '-' with at most one '/', "
            f"start with a letter or digit and be at most {MAX_MODEL_NAME_LEN} characters"
        )
    return model


def check_public_name(name: str) -> str:
    """``name`` if it may be shown as a server's public name: at most MAX_PUBLIC_NAME_LEN printable characters
    (no control, format or line-separator characters), no surrounding spaces; raises InvalidRecord otherwise."""
    if len(name) > MAX_PUBLIC_NAME_LEN:
        raise InvalidRecord(f"public name is {len(name)} characters long, more than {MAX_PUBLIC_NAME_LEN}")
    if not name.isprintable() or name != name.strip():
        raise InvalidRecord(f"public name {name[:MAX_PUBLIC_NAME_LEN]!r} holds unprintable characters or outer spaces")
    return name


# ---- keys ----


def block_key(model: str, block: int) -> str:
    """The DHT key of one block of ``model``."""
    check_model_name(model)
    if not 0 <= block < MAX_BLOCKS:
        raise InvalidRecord(f"block {block} is outside [0, {MAX_BLOCKS})")
    return f"/{NAMESPACE}/{model}/{block}"


def parse_block_key(key: str) -> tuple[str, int]:
    """``(model, block)`` of a block key; raises InvalidRecord for any other key."""
    prefix = f"/{NAMESPACE}/"
    model, _, block = key.removeprefix(prefix).rpartition("/")
    if not key.startswith(prefix) or not block.isdigit() or not block.isascii():
        raise InvalidRecord(f"{key!r} is not a block key /{NAMESPACE}/<model>/<block>")
    if block_key(model, int(block)) != key:
        raise InvalidRecord(f"{key!r} is not in canonical form")
    return model, int(block)


# ---- signing ----


def _signed_bytes(domain: str, key: str, entry: ServerEntry | ModelEntry) -> bytes:
    """The canonical bytes an entry's signature covers: domain, key, every field but the signature."""
    wire = entry.to_wire()
    values = [wire[f.name] for f in dataclasses.fields(entry) if f.name != "signature"]
    return msgpack.packb([domain, key, values], use_bin_type=True)


def _domain(entry: ServerEntry | ModelEntry) -> str:
    return _ENTRY_DOMAIN if isinstance(entry, ServerEntry) else _MODEL_DOMAIN


def sign_entry(key: str, entry: Entry, key_pair: KeyPair) -> Entry:
    """A copy of ``entry`` with its public key and signature for DHT key ``key``."""
    if entry.peer_id != str(peer_id_of(key_pair)):
        raise ValueError(f"entry claims peer {entry.peer_id} but the key belongs to {peer_id_of(key_pair)}")
    unsigned = dataclasses.replace(entry, public_key=key_pair.public_key.serialize(), signature=b"")
    signature = key_pair.private_key.sign(_signed_bytes(_domain(unsigned), key, unsigned))
    signed = dataclasses.replace(unsigned, signature=signature)
    # Fail here, not at every reader: an entry that does not parse back would be dropped everywhere.
    type(entry).from_wire(signed.to_wire())
    return signed


def verify_entry(key: str, entry: ServerEntry | ModelEntry) -> None:
    """Raise InvalidRecord unless ``entry`` is signed for ``key`` by the owner of ``entry.peer_id``."""
    try:
        public_key = deserialize_public_key(entry.public_key)
    except Exception:
        raise InvalidRecord(f"entry of {entry.peer_id} carries an unreadable public key") from None
    if str(ID.from_pubkey(public_key)) != entry.peer_id:
        raise InvalidRecord(f"entry claims peer {entry.peer_id} but is signed with another peer's key")
    if not public_key.verify(_signed_bytes(_domain(entry), key, entry), entry.signature):
        raise InvalidRecord(f"entry of {entry.peer_id} for {key} has a bad signature")
    if isinstance(entry, ServerEntry):
        _, block = parse_block_key(key)
        if not entry.start <= block < entry.end:
            raise InvalidRecord(f"entry of {entry.peer_id} spans [{entry.start}, {entry.end}), not {key}")


# ---- values: decode, merge, encode (pure) ----


def _unpack_map(data: bytes, what: str) -> dict[Any, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise InvalidRecord(f"{what} is not valid msgpack: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidRecord(f"{what} is {type(obj).__name__}, not a map")
    return obj


def _peer_map(key: str, obj: object, parse: Callable[[object], Entry], strict: bool) -> dict[str, Entry]:
    """Parse and verify a map peer_id -> wire entry; bad entries raise (strict) or are skipped."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"value of {key} is {type(obj).__name__}, not a map of peers")
    if len(obj) > MAX_ENTRIES_PER_VALUE:
        raise InvalidRecord(f"value of {key} has {len(obj)} entries, more than {MAX_ENTRIES_PER_VALUE}")
    entries: dict[str, Entry] = {}
    for peer_id, wire in obj.items():
        try:
            entry = parse(wire)
            if entry.peer_id != peer_id:
                raise InvalidRecord(f"entry of {entry.peer_id} is filed under {peer_id!r}")
            verify_entry(key, entry)
        except InvalidRecord as e:
            if strict:
                raise
            logger.debug("dropping an entry of %s: %s", key, e)
            continue
        entries[peer_id] = entry
    return entries


def decode_block_value(key: str, data: bytes) -> dict[str, ServerEntry]:
    """Every entry of a block value, each verified; raises InvalidRecord if any is bad."""
    return _peer_map(key, _unpack_map(data, f"value of {key}"), ServerEntry.from_wire, strict=True)


def encode_block_value(entries: dict[str, ServerEntry]) -> bytes:
    """The DHT value for a block: msgpack map peer_id -> wire entry.

    ``entries`` are in priority order (as ``merge_block_values`` returns them): only the first
    MAX_ENTRIES_PER_VALUE are stored."""
    kept = dict(list(entries.items())[:MAX_ENTRIES_PER_VALUE])
    return msgpack.packb({p: e.to_wire() for p, e in sorted(kept.items())}, use_bin_type=True)


def is_live(entry: ServerEntry | ModelEntry, now: float) -> bool:
    """Whether ``entry`` is within its lifetime by a reader's clock ``now``: not expired, and not
    dated more than MAX_CLOCK_SKEW_S / 2 ahead (its lifetime is at most MAX_ENTRY_TTL_S: from_wire)."""
    return entry.updated_at <= now + MAX_CLOCK_SKEW_S / 2 and now < entry.expires_at


def _rank(entry: ServerEntry | ModelEntry) -> tuple[bool, float]:
    """Order within one copy: serving entries before OFFLINE ones, then the newest first."""
    leaving = isinstance(entry, ServerEntry) and entry.state == ServerState.OFFLINE
    return leaving, -entry.updated_at


def _union_by_turns(copies: Sequence[dict[K, Entry]], now: float) -> dict[K, Entry]:
    """Union of ``copies``: per key the newest live entry, in priority order, the copies taking turns.

    The order is round-robin over the copies: first the best entry of every copy (by ``_rank``),
    then the second of every copy, and so on. A copy is one replica's value, or a writer's own
    fresh entry; so the first MAX_ENTRIES_PER_VALUE // len(copies) entries of ANY copy come before
    the cap, however many entries the other copies hold, and a writer's own entry comes in the
    first turn. Timestamps decide only the order inside one copy, never between copies.
    """
    newest: dict[K, Entry] = {}
    for entries in copies:
        for k, entry in entries.items():
            if is_live(entry, now) and (k not in newest or entry.updated_at > newest[k].updated_at):
                newest[k] = entry
    turns = [sorted((k for k in entries if k in newest), key=lambda k, e=entries: _rank(e[k])) for entries in copies]
    ordered: dict[K, Entry] = {}
    for turn in itertools.zip_longest(*turns):
        for k in turn:
            if k is not None and k not in ordered:
                ordered[k] = newest[k]
    return ordered


def merge_block_values(key: str, values: list[dict[Any, Any]], now: float) -> dict[str, ServerEntry]:
    """Union of the copies of block ``key``: per peer the newest entry; expired, future-dated and
    invalid ones dropped. All of them, in priority order (``_union_by_turns``): a reader sees every
    live entry any replica holds; ``encode_block_value`` stores the first MAX_ENTRIES_PER_VALUE.

    ``values`` are decoded msgpack maps (peer_id -> wire entry) from different replicas; a copy
    that is not a map is ignored, and so is every entry that fails parsing or verification.
    """
    copies = []
    for value in values:
        try:
            copies.append(_peer_map(key, value, ServerEntry.from_wire, strict=False))
        except InvalidRecord as e:
            logger.debug("ignoring a copy of %s: %s", key, e)
    return _union_by_turns(copies, now)


def decode_model_index(data: bytes) -> dict[str, dict[str, ModelEntry]]:
    """Every entry of the model index, each verified; raises InvalidRecord if any is bad."""
    obj = _unpack_map(data, "model index")
    index = {}
    for model, peers in obj.items():
        if not isinstance(model, str):
            raise InvalidRecord(f"model index has a {type(model).__name__} key, not a model name")
        entries = _peer_map(MODEL_INDEX_KEY, peers, ModelEntry.from_wire, strict=True)
        if any(e.model != model for e in entries.values()):
            raise InvalidRecord(f"model index files an entry of another model under {model!r}")
        index[model] = entries
    total = sum(len(entries) for entries in index.values())
    if total > MAX_ENTRIES_PER_VALUE:
        raise InvalidRecord(f"model index has {total} entries, more than {MAX_ENTRIES_PER_VALUE}")
    return index


def encode_model_index(index: dict[str, dict[str, ModelEntry]]) -> bytes:
    """The DHT value of the model index: msgpack map model -> peer_id -> wire entry.

    At most MAX_ENTRIES_PER_VALUE entries, the models taking turns (each model's entries in the
    priority order ``merge_model_indexes`` gives them): no model takes another's share."""
    turns = itertools.zip_longest(*([(m, p) for p in peers] for m, peers in index.items()))
    kept = [pair for turn in turns for pair in turn if pair is not None][:MAX_ENTRIES_PER_VALUE]
    obj: dict[str, dict[str, Any]] = {}
    for model, peer_id in sorted(kept):
        obj.setdefault(model, {})[peer_id] = index[model][peer_id].to_wire()
    return msgpack.packb(obj, use_bin_type=True)


def merge_model_indexes(values: list[dict[Any, Any]], now: float) -> dict[str, dict[str, ModelEntry]]:
    """Union of copies of the model index, with the same per-entry rules and order as
    ``merge_block_values`` (each model's entries in priority order)."""
    copies: list[dict[tuple[str, str], ModelEntry]] = []
    for value in values:
        if not isinstance(value, dict):
            continue
        copy: dict[tuple[str, str], ModelEntry] = {}
        for model, peers in value.items():
            try:
                entries = _peer_map(MODEL_INDEX_KEY, peers, ModelEntry.from_wire, strict=False)
            except InvalidRecord as e:
                logger.debug("ignoring model %r in a copy of the index: %s", model, e)
                continue
            copy.update({(model, p): e for p, e in entries.items() if e.model == model})
        copies.append(copy)
    index: dict[str, dict[str, ModelEntry]] = {}
    for (model, peer_id), entry in _union_by_turns(copies, now).items():
        index.setdefault(model, {})[peer_id] = entry
    return index


def model_block_counts(index: dict[str, dict[str, ModelEntry]]) -> dict[str, int]:
    """Model name -> number of blocks, as announced by most of its servers."""
    return {
        model: Counter(e.num_blocks for e in peers.values()).most_common(1)[0][0]
        for model, peers in sorted(index.items())
        if peers
    }


def _live_entries(key: str, data: bytes, now: float) -> dict[Hashable, ServerEntry | ModelEntry] | None:
    """The live entries of a value of ``key``, by peer id ((model, peer id) in the index); None if invalid."""
    try:
        if key == MODEL_INDEX_KEY:
            index = decode_model_index(data)
            entries: dict[Hashable, ServerEntry | ModelEntry] = {
                (model, p): e for model, peers in index.items() for p, e in peers.items()
            }
        else:
            entries = dict(decode_block_value(key, data))
    except InvalidRecord:
        return None
    return {k: e for k, e in entries.items() if is_live(e, now)}


def supersedes(new: dict[K, Entry], old: dict[K, Entry]) -> bool:
    """Whether a value with live entries ``new`` may replace one with live entries ``old``: it keeps
    every entry of ``old`` (none missing, none older) and brings news (an entry ``old`` lacks, or a
    newer one)."""
    kept = all(k in new and new[k].updated_at >= e.updated_at for k, e in old.items())
    return kept and any(k not in old or e.updated_at > old[k].updated_at for k, e in new.items())


class PetalRecordValidator(Validator):
    """KadDHT validator for the ``petal`` namespace (block values and the model index).

    A storing peer keeps what it holds unless a PUT supersedes it (``select``): a PUT can add
    entries or refresh them, never drop a live one. So a flood of entries from throw-away keys can
    sit next to the servers a peer stores, up to MAX_ENTRIES_PER_VALUE, but cannot push them out;
    and a server's heartbeat, which reads the stored copy and adds its fresh entry, supersedes it.
    Entries dated more than MAX_CLOCK_SKEW_S ahead make a value invalid: a flood cannot outlive
    the servers by its timestamps (an entry lives at most MAX_ENTRY_TTL_S).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # this node's wall clock (a test pins it)

    def validate(self, key: str, value: bytes) -> None:
        """Raise InvalidRecord unless every entry of ``value`` is well-formed, signed for ``key`` and
        not dated more than MAX_CLOCK_SKEW_S ahead of this node's clock."""
        if key == MODEL_INDEX_KEY:
            entries: list[ServerEntry | ModelEntry] = [
                e for p in decode_model_index(value).values() for e in p.values()
            ]
        else:
            parse_block_key(key)
            entries = list(decode_block_value(key, value).values())
        limit = self.clock() + MAX_CLOCK_SKEW_S
        ahead = [e.peer_id for e in entries if e.updated_at > limit]
        if ahead:
            raise InvalidRecord(
                f"value of {key} has {len(ahead)} entries dated over {MAX_CLOCK_SKEW_S:.0f} s ahead of this "
                f"node's clock (one by {ahead[0]})"
            )

    def select(self, key: str, values: list[bytes]) -> int:
        """Index of the value to keep; ``values[0]`` is the one a storing peer holds (py-libp2p's
        PUT_VALUE asks ``select(key, [stored, received])``). A later value replaces the choice so far
        only if it ``supersedes`` it; an invalid value is never chosen over a valid one."""
        now = self.clock()
        live = [_live_entries(key, v, now) for v in values]
        best = next((i for i, entries in enumerate(live) if entries is not None), 0)
        for i in range(best + 1, len(values)):
            candidate, chosen = live[i], live[best]
            if candidate is not None and chosen is not None and supersedes(candidate, chosen):
                best = i
        return best


# ---- the network side ----


def serves_dht(host: IHost, peer: ID) -> bool:
    """Whether `peer` told us (by identify) that it answers DHT requests: a server-mode peer, not a client."""
    try:
        return str(KAD_PROTOCOL) in (host.get_peerstore().get_protocols(peer) or [])
    except Exception:  # noqa: BLE001 - a peer the peerstore does not know (yet) is not known to serve
        return False


class _ServerPeersOnlyDHT(KadDHT):
    """KadDHT whose routing table takes only peers that serve the DHT. py-libp2p adds every peer that sends it a
    request, assuming a requester is a server; clients (client mode) request too, and once gone they would
    fill routing tables and cost every read a timeout."""

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        if not serves_dht(self.host, peer_id):
            return False
        return await super().add_peer(peer_id)


class BootstrapError(RuntimeError):
    """None of the bootstrap peers could be reached."""


class SwarmReadError(RuntimeError):
    """A read of the swarm did not get enough answers to tell what it holds (timed out, or too many of the
    peers closest to a key did not answer): an unknown, never an empty answer."""

    def __init__(self, message: str, found: dict[int, dict[str, ServerEntry]] | None = None):
        super().__init__(message)
        self.found = found or {}  # what the blocks that were read conclusively hold


@dataclass
class _Copies:
    """What a read of one key found: the decoded copies, the peers to write back to, and whether the swarm
    answered well enough for an empty result to mean "nobody wrote this key"."""

    values: list[dict[Any, Any]]
    peers: list[ID]
    conclusive: bool = True


class SwarmDHT:
    """Announce and look up servers of model blocks over a running KadDHT (server mode)."""

    def __init__(self, kad: KadDHT) -> None:
        self.kad = kad
        self.host: IHost = kad.host
        # Peer -> trio time until which it is skipped: it did not answer a request in time.
        self._unresponsive: dict[ID, float] = {}

    async def bootstrap(self, addrs: Sequence[str], timeout: float = CONNECT_TIMEOUT_S) -> int:
        """Connect to ``addrs`` (``/ip4/../tcp/P/p2p/ID``), then fill the routing table by a lookup.

        Returns how many bootstrap peers answered; raises BootstrapError if ``addrs`` is not empty
        and none did.
        """
        reached: list[ID] = []

        async def reach(addr: str) -> None:
            try:
                info = info_from_p2p_addr(Multiaddr(addr))
                with trio.fail_after(timeout):
                    await self.host.connect(info)
                    await self.kad.routing_table.add_peer(info)
                reached.append(info.peer_id)
            except Exception as e:
                logger.warning("bootstrap peer %s is unreachable: %s", addr, e)

        async with trio.open_nursery() as nursery:
            for addr in addrs:
                nursery.start_soon(reach, addr)
        if addrs and not reached:
            raise BootstrapError(f"none of the bootstrap peers answered: {', '.join(addrs)}")
        # Twice: a KadDHT peer adds a requester to its routing table when a request stream opens,
        # only if it already knows the requester's addresses, which come in the request's body (or
        # later by identify). The first lookup fills our table; the second gets us into theirs.
        for _ in range(2):
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                await self.kad.peer_routing.find_closest_peers_network(self.host.get_id().to_bytes())
        return len(reached)

    async def announce(
        self, model: str, entry: ServerEntry, key_pair: KeyPair, *, num_blocks: int, ttl: float = ENTRY_TTL_S
    ) -> int:
        """Publish ``entry`` under each block of its span, and ``model`` (``num_blocks``) in the index.

        The entry is stamped ``updated_at=now``, ``expires_at=now+ttl`` and signed per key. Each key
        is read from the network, merged with the fresh entry and written back, so this is
        idempotent; call it every ~ttl/3 s. Returns the fewest peers that stored any one key
        (0: no other peer holds the announcement yet, only this node's own copy).
        """
        if entry.end > num_blocks:
            raise ValueError(f"span [{entry.start}, {entry.end}) exceeds the model's {num_blocks} blocks")
        now = time.time()
        entry = dataclasses.replace(entry, updated_at=now, expires_at=now + ttl)
        index_entry = ModelEntry(
            model=model, num_blocks=num_blocks, peer_id=entry.peer_id, updated_at=now, expires_at=now + ttl
        )
        # Signing checks the entries: a bad one fails here, once, before any network traffic.
        sign_entry(block_key(model, entry.start), entry, key_pair)
        sign_entry(MODEL_INDEX_KEY, index_entry, key_pair)
        stored: list[int] = []

        async def announce_key(key: str) -> None:
            copies = await self._read(key)
            if key == MODEL_INDEX_KEY:
                own_index = {model: {entry.peer_id: sign_entry(key, index_entry, key_pair).to_wire()}}
                value = encode_model_index(merge_model_indexes([*copies.values, own_index], time.time()))
            else:
                own = {entry.peer_id: sign_entry(key, entry, key_pair).to_wire()}
                value = encode_block_value(merge_block_values(key, [*copies.values, own], time.time()))
            stored.append(await self._write(key, value, copies.peers))

        keys = [MODEL_INDEX_KEY] + [block_key(model, block) for block in range(entry.start, entry.end)]
        await self._for_each(keys, announce_key)
        return min(stored)

    async def get_servers(self, model: str, blocks: Sequence[int]) -> dict[int, dict[str, ServerEntry]]:
        """For each block, the live, verified entries of the servers covering it (network read).

        Raises SwarmReadError (with what was read conclusively) when a block came back empty from a read
        that lost too many answers: "served by no one" is said only when the swarm answered."""
        found: dict[int, dict[str, ServerEntry]] = {}
        unknown: list[int] = []

        async def read_block(block: int) -> None:
            key = block_key(model, block)
            copies = await self._read(key)
            entries = merge_block_values(key, copies.values, time.time())
            if entries or copies.conclusive:
                found[block] = entries
            else:
                unknown.append(block)

        await self._for_each(blocks, read_block)
        if unknown:
            raise SwarmReadError(
                f"the swarm did not answer reads of {len(unknown)} of {len(blocks)} blocks of {model}",
                {block: found[block] for block in blocks if block in found},
            )
        return {block: found[block] for block in blocks}

    async def list_models(self) -> dict[str, int]:
        """Model name -> number of blocks, for every model with a live announcement."""
        copies = await self._read(MODEL_INDEX_KEY)
        return model_block_counts(merge_model_indexes(copies.values, time.time()))

    async def _for_each(self, items: Iterable[T], work: Callable[[T], Awaitable[None]]) -> None:
        """Run ``work(item)`` for every item, at most PARALLEL_KEYS at a time."""
        limiter = trio.CapacityLimiter(PARALLEL_KEYS)

        async def bounded(item: T) -> None:
            async with limiter:
                await work(item)

        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(bounded, item)

    async def _read(self, key: str) -> _Copies:
        """Every copy of ``key`` held by its REPLICAS closest peers and by this node, decoded.

        An iterative Kademlia lookup where each query is a GET_VALUE: it returns the peer's copy
        and the peers it knows closer to the key, so finding the peers and reading them is one
        round trip per peer. Stops when the REPLICAS closest peers known have all been asked.
        """
        key_bytes = key.encode()
        me = self.host.get_id()
        known = set(self.kad.routing_table.find_local_closest_peers(key_bytes, REPLICAS))
        known |= {peer for peer in self.host.get_connected_peers() if serves_dht(self.host, peer)}  # not clients
        known.discard(me)
        asked: set[ID] = set()
        answered: set[ID] = set()
        raw: list[bytes] = []
        local = self.kad.value_store.get(key_bytes)
        if local is not None and local.value:
            raw.append(local.value)

        async def query(peer: ID) -> None:
            answer = await self._copy_from_peer(peer, key_bytes)
            if answer is not None:
                answered.add(peer)
                value, closer = answer
                if value:
                    raw.append(value)
                known.update(p for p in closer if p != me)

        with trio.move_on_after(LOOKUP_TIMEOUT_S) as scope:
            for _ in range(LOOKUP_ROUNDS):
                candidates = [p for p in known if p not in asked and self._responsive(p)]
                closest = sort_peer_ids_by_distance(key_bytes, candidates + list(answered))[:REPLICAS]
                todo = [p for p in closest if p not in asked]
                if not todo:
                    break
                asked.update(todo)
                async with trio.open_nursery() as nursery:
                    for peer in todo:
                        nursery.start_soon(query, peer)
        if scope.cancelled_caught:
            logger.warning("reading %s from the swarm timed out after %.0f s", key, LOOKUP_TIMEOUT_S)
        # the closest peers asked are those that should hold the key: an empty read means "nobody wrote it"
        # only if most of them answered, or no other peer is known at all (a swarm of one)
        closest_asked = sort_peer_ids_by_distance(key_bytes, list(asked))[:REPLICAS]
        majority = 2 * len(answered.intersection(closest_asked)) >= len(closest_asked)
        conclusive = not scope.cancelled_caught and majority and (bool(asked) or not known)
        values = []
        for data in raw:
            try:
                values.append(_unpack_map(data, f"a copy of {key}"))
            except InvalidRecord as e:
                logger.debug("ignoring %s", e)
        return _Copies(values, sort_peer_ids_by_distance(key_bytes, list(answered))[:REPLICAS], conclusive)

    async def _write(self, key: str, value: bytes, peers: list[ID]) -> int:
        """Store ``value`` locally and at ``peers``; return how many peers accepted it."""
        key_bytes = key.encode()
        self.kad.value_store.put(key_bytes, value)
        accepted = []

        async def store(peer: ID) -> None:
            if await self._store_at_peer(peer, key_bytes, value):
                accepted.append(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(store, peer)
        return len(accepted)

    def _responsive(self, peer: ID) -> bool:
        """False while ``peer`` is skipped for having failed a request (for UNRESPONSIVE_S)."""
        until = self._unresponsive.get(peer)
        if until is not None and until <= trio.current_time():
            del self._unresponsive[peer]
            until = None
        return until is None

    async def _exchange(self, peer: ID, request: Callable[[], Awaitable[R]]) -> R | None:
        """``request()`` to ``peer`` within REQUEST_TIMEOUT_S; None (and ``peer`` skipped for a
        while) if it timed out or left us unconnected to ``peer``: one hung peer must not cost a
        timeout for every key."""
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            result = await request()
            if self.host.get_network().get_connections(peer):
                return result
        logger.info("peer %s did not answer a DHT request; skipping it for %.0f s", peer, UNRESPONSIVE_S)
        self._unresponsive[peer] = trio.current_time() + UNRESPONSIVE_S
        self.kad.routing_table.remove_peer(peer)  # a gone peer is not offered to others, nor asked again
        return None

    async def _copy_from_peer(self, peer: ID, key_bytes: bytes) -> tuple[bytes | None, list[ID]] | None:
        """One GET_VALUE exchange: the peer's copy (None if it has none) and the closer peers it
        knows; None if the peer did not answer."""

        async def get() -> tuple[bytes | None, list[ID]]:
            record, closer = await self.kad.value_store._get_from_peer(
                peer, key_bytes, return_record=True, return_closer_peers=True
            )
            return (record.value if isinstance(record, Record) else None), closer

        return await self._exchange(peer, get)

    async def _store_at_peer(self, peer: ID, key_bytes: bytes, value: bytes) -> bool:
        """One PUT_VALUE exchange with ``peer``; False when it refuses or does not answer."""
        store = self.kad.value_store._store_at_peer
        return bool(await self._exchange(peer, lambda: store(peer, key_bytes, value)))


@asynccontextmanager
async def open_swarm_dht(
    host: IHost, bootstrap_addrs: Sequence[str] = (), *, client: bool = False
) -> AsyncIterator[SwarmDHT]:
    """Run a KadDHT with the ``petal`` validator on ``host``; bootstrap; yield it.

    Nodes run it in server mode; clients (and ``petald status``) in client mode, so that peers which
    come and go are never put in anyone's routing table or asked to store values."""
    kad = _ServerPeersOnlyDHT(host, DHTMode.CLIENT if client else DHTMode.SERVER)
    kad.register_validator(NAMESPACE, PetalRecordValidator())
    async with unwrapped_groups(), background_trio_service(kad):
        swarm = SwarmDHT(kad)
        if bootstrap_addrs:
            await swarm.bootstrap(bootstrap_addrs)
        yield swarm
