"""RFC 6962 / RFC 9162 Merkle tree (SHA-256) kept as stored "perfect" subtrees.

The audit log lives in a database, so nothing here ever needs all leaves in
memory. Only perfect subtrees are stored, addressed as ``(level, index)``:
level 0 holds the leaf hashes and node ``(l, i)`` covers leaves
``[i * 2**l, (i + 1) * 2**l)``. Such a node never changes once it exists, so
rows are insert-only. Every other hash a proof needs (the root of a tree whose
size is not a power of two, or the right-hand sibling that is still being
filled) is "ephemeral": it is folded on the fly from O(log n) perfect nodes.

Each operation first works out every key it needs and asks the `NodeReader`
for all of them in one call, so a database reader does one query.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "MemoryNodes",
    "MissingNodeError",
    "NodeKey",
    "NodeReader",
    "ProofError",
    "append_nodes",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_at",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
# RFC 9162 §2.1.1: the hash of an empty list is the hash of the empty string.
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

NodeKey = tuple[int, int]
"""``(level, index)`` of a perfect subtree."""


class ProofError(Exception):
    """A proof does not verify; the message says why, briefly."""


class MissingNodeError(LookupError):
    """The node store lacks nodes that a tree of the requested size must have.

    Distinct from `ProofError`: this is a fault (or tampering) on the storing
    side, not a bad proof presented by someone else.
    """

    def __init__(self, keys: Sequence[NodeKey]) -> None:
        self.keys: tuple[NodeKey, ...] = tuple(keys)
        shown = ", ".join(f"{lvl}/{idx}" for lvl, idx in self.keys[:8])
        more = "" if len(self.keys) <= 8 else f" and {len(self.keys) - 8} more"
        super().__init__(f"missing Merkle nodes (level/index): {shown}{more}")


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1 interior hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


class NodeReader(Protocol):
    """Source of stored perfect-subtree hashes.

    Returns whichever of ``keys`` it has; absent keys are simply left out (the
    caller decides whether that is an error).
    """

    def get_nodes(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]: ...


class MemoryNodes(NodeReader):
    """A dict-backed node store, for tests and the offline verifier."""

    def __init__(self, nodes: Iterable[tuple[int, int, bytes]] = ()) -> None:
        self._nodes: dict[NodeKey, bytes] = {}
        self.add(nodes)

    def add(self, nodes: Iterable[tuple[int, int, bytes]]) -> None:
        """Store ``(level, index, hash)`` triples, as returned by the append functions.

        Perfect nodes are immutable, so re-adding one with a different hash is
        refused rather than silently rewriting history.
        """
        for level, index, digest in nodes:
            old = self._nodes.setdefault((level, index), digest)
            if old != digest:
                raise ValueError(f"node {level}/{index} already stored with another hash")

    def get_nodes(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]:
        return {key: self._nodes[key] for key in keys if key in self._nodes}

    def __len__(self) -> int:
        return len(self._nodes)


# --- tree geometry -----------------------------------------------------------


def _cover(start: int, end: int) -> list[NodeKey]:
    """The maximal aligned perfect subtrees covering leaves ``[start, end)``, left to right."""
    keys: list[NodeKey] = []
    while start < end:
        level = (end - start).bit_length() - 1
        if start:
            # A perfect node must start on a multiple of its own width.
            level = min(level, (start & -start).bit_length() - 1)
        keys.append((level, start >> level))
        start += 1 << level
    return keys


def _fold(hashes: Sequence[bytes]) -> bytes:
    """Hash of a subtree from its `_cover` nodes.

    Only valid when the range starts on a boundary at least as wide as the
    range itself (the whole tree, or a right-border subtree): then RFC 9162's
    "split at the largest power of two below n" puts the first cover node on
    the left and recurses on the rest, which is exactly a right fold.
    """
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = node_hash(left, result)
    return result


def _path(index: int, level: int, size: int) -> list[list[NodeKey]]:
    """Siblings on the way from node ``(level, index)`` up to the root of a ``size`` tree.

    Bottom-up, as RFC 9162 orders proofs. Each entry is the cover of one
    sibling: one key for a perfect sibling, several for the ephemeral
    right-border one. A sibling that starts past the end of the tree does not
    exist (RFC 6962 promotes the lone child), so it is skipped.
    """
    items: list[list[NodeKey]] = []
    while not (index == 0 and (1 << level) >= size):
        start = (index ^ 1) << level
        if start < size:
            items.append(_cover(start, min(start + (1 << level), size)))
        index >>= 1
        level += 1
    return items


def _fetch(reader: NodeReader, keys: Iterable[NodeKey]) -> dict[NodeKey, bytes]:
    wanted = list(dict.fromkeys(keys))
    if not wanted:
        return {}
    got = reader.get_nodes(wanted)
    missing = [key for key in wanted if key not in got]
    if missing:
        raise MissingNodeError(missing)
    for key in wanted:
        if len(got[key]) != HASH_SIZE:
            # A truncated hash from the store would otherwise surface much later
            # as an inexplicable root mismatch.
            raise ValueError(f"stored node {key[0]}/{key[1]} is not {HASH_SIZE} bytes")
    return {key: bytes(got[key]) for key in wanted}


def _hash_items(reader: NodeReader, items: Sequence[Sequence[NodeKey]]) -> list[bytes]:
    nodes = _fetch(reader, (key for item in items for key in item))
    return [_fold([nodes[key] for key in item]) for item in items]


def _check_size(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must not be negative")


# --- building ----------------------------------------------------------------


class CompactRange:
    """The right frontier of a tree: hashes of the perfect subtrees covering ``[0, size)``.

    Highest level first, one per set bit of ``size``. It is all that is needed
    to append and to compute the root, so a batch of appends costs one read.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        _check_size("size", size)
        if len(hashes) != size.bit_count():
            raise ValueError(f"a tree of size {size} has {size.bit_count()} frontier hashes")
        if any(len(h) != HASH_SIZE for h in hashes):
            raise ValueError(f"frontier hashes must be {HASH_SIZE} bytes")
        self._size = size
        self._hashes = [bytes(h) for h in hashes]

    @classmethod
    def from_reader(cls, size: int, reader: NodeReader) -> CompactRange:
        """Load the frontier of the first ``size`` leaves with one `get_nodes` call."""
        _check_size("size", size)
        keys = _cover(0, size)
        nodes = _fetch(reader, keys)
        return cls(size, [nodes[key] for key in keys])

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; return the new perfect nodes ``(level, index, hash)``.

        The first is the leaf itself at ``(0, old size)``, then every parent it
        completes, lowest first.
        """
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes")
        created = [(0, self._size, bytes(leaf))]
        digest, level, index = bytes(leaf), 0, self._size
        # Each set low bit of the old size is a left sibling waiting for this leaf.
        while (self._size >> level) & 1:
            digest = node_hash(self._hashes.pop(), digest)
            level += 1
            index >>= 1
            created.append((level, index, digest))
        self._hashes.append(digest)
        self._size += 1
        return created

    def root(self) -> bytes:
        """MTH of the leaves appended so far (`EMPTY_ROOT` when there are none)."""
        return _fold(self._hashes) if self._hashes else EMPTY_ROOT


def append_nodes(size: int, leaf: bytes, reader: NodeReader) -> list[tuple[int, int, bytes]]:
    """New perfect nodes created by appending ``leaf`` to a tree of ``size`` leaves.

    Reads only the left siblings that the new leaf completes (one batch); use
    `CompactRange` instead when appending several leaves.
    """
    _check_size("size", size)
    if len(leaf) != HASH_SIZE:
        raise ValueError(f"leaf hash must be {HASH_SIZE} bytes")
    trailing_ones = (~size & (size + 1)).bit_length() - 1
    keys = [(level, (size >> level) - 1) for level in range(trailing_ones)]
    nodes = _fetch(reader, keys)
    created = [(0, size, bytes(leaf))]
    digest = bytes(leaf)
    for level, index in keys:
        digest = node_hash(nodes[(level, index)], digest)
        created.append((level + 1, index >> 1, digest))
    return created


# --- reading and proving -----------------------------------------------------


def root_at(size: int, reader: NodeReader) -> bytes:
    """MTH of the first ``size`` leaves, from at most log2(size) + 1 stored nodes."""
    _check_size("size", size)
    if size == 0:
        return EMPTY_ROOT
    return _hash_items(reader, [_cover(0, size)])[0]


def inclusion_proof(index: int, size: int, reader: NodeReader) -> list[bytes]:
    """RFC 9162 §2.1.3.1 audit path for leaf ``index`` in the tree of ``size`` leaves."""
    _check_size("index", index)
    if index >= size:
        raise ValueError(f"leaf index {index} is not below tree size {size}")
    return _hash_items(reader, _path(index, 0, size))


def consistency_proof(old_size: int, new_size: int, reader: NodeReader) -> list[bytes]:
    """RFC 9162 §2.1.4.1 consistency proof from ``old_size`` to ``new_size``.

    Empty when the sizes are equal. ``old_size == 0 < new_size`` is refused:
    RFC 9162 defines no such proof (every tree extends the empty one) and
    `verify_consistency` rejects it, so the caller must special-case it.
    """
    _check_size("old_size", old_size)
    if old_size > new_size:
        raise ValueError(f"old size {old_size} exceeds new size {new_size}")
    if old_size == new_size:
        return []
    if old_size == 0:
        raise ValueError("there is no consistency proof from the empty tree")
    # The old tree's last leaf sits in a perfect node whose level is the number
    # of trailing zero bits of old_size; the proof is that node (unless it is
    # the whole old tree, which the verifier already holds as root1) followed
    # by its path to the new root.
    level = (old_size & -old_size).bit_length() - 1
    index = (old_size >> level) - 1
    items = _path(index, level, new_size)
    if index != 0:
        items.insert(0, [(level, index)])
    return _hash_items(reader, items)


# --- verifying ---------------------------------------------------------------


def _check_proof_hashes(proof: Sequence[bytes]) -> None:
    for position, element in enumerate(proof):
        if len(element) != HASH_SIZE:
            raise ProofError(f"proof element {position} is not {HASH_SIZE} bytes")


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check an inclusion proof (RFC 9162 §2.1.3.2); raise `ProofError` if it fails."""
    if leaf_index < 0 or tree_size < 0:
        raise ProofError("negative leaf index or tree size")
    if leaf_index >= tree_size:
        raise ProofError(f"leaf index {leaf_index} is not below tree size {tree_size}")
    if len(leaf) != HASH_SIZE:
        raise ProofError(f"leaf hash is not {HASH_SIZE} bytes")
    _check_proof_hashes(proof)

    fn, sn = leaf_index, tree_size - 1
    result = leaf
    for element in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            result = node_hash(element, result)
            # On the right border: skip the levels where this node has no sibling.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, element)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if not hmac.compare_digest(result, root):
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """Check a consistency proof (RFC 9162 §2.1.4.2); raise `ProofError` if it fails.

    Stricter than the RFC at the edges: equal sizes need an empty proof and
    equal roots (and a size-0 root must be `EMPTY_ROOT`); ``size1 == 0 <
    size2`` is rejected because there is nothing a proof could show.
    """
    if size1 < 0 or size2 < 0:
        raise ProofError("negative tree size")
    if size1 > size2:
        raise ProofError(f"old size {size1} exceeds new size {size2}")
    if size1 == size2:
        if proof:
            raise ProofError("proof must be empty when the sizes are equal")
        if size1 == 0 and not (
            hmac.compare_digest(root1, EMPTY_ROOT) and hmac.compare_digest(root2, EMPTY_ROOT)
        ):
            raise ProofError("the root of an empty tree must be the empty hash")
        if not hmac.compare_digest(root1, root2):
            raise ProofError("roots differ for trees of equal size")
        return
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if not proof:
        raise ProofError("consistency proof is empty")
    _check_proof_hashes(proof)

    path = list(proof)
    if size1 & (size1 - 1) == 0:
        # The old tree is itself a perfect subtree, so its root is the seed.
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    old_root = new_root = path[0]
    for element in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            old_root = node_hash(element, old_root)
            new_root = node_hash(element, new_root)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            new_root = node_hash(new_root, element)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if not hmac.compare_digest(old_root, root1):
        raise ProofError("consistency proof does not lead to the old root")
    if not hmac.compare_digest(new_root, root2):
        raise ProofError("consistency proof does not lead to the new root")
