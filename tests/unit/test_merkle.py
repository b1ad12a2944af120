"""Merkle tree built from stored perfect nodes, checked against the RFC 9162 recursion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from security.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MemoryNodes,
    MissingNodeError,
    NodeKey,
    ProofError,
    append_nodes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_at,
    verify_consistency,
    verify_inclusion,
)

MAX_SIZE = 300
# Building a 300-leaf tree and the naive proofs takes a few milliseconds; the
# default deadline would make the suite flaky on a loaded CI runner.
PROPERTY = settings(max_examples=100, deadline=None)


# --- naive reference: RFC 9162 §2.1 written as literally as possible ------------


def _split(n: int) -> int:
    """Largest power of two strictly below n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def naive_root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(naive_root(leaves[:k]), naive_root(leaves[k:]))


def naive_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    if len(leaves) <= 1:
        return []
    k = _split(len(leaves))
    if m < k:
        return [*naive_path(m, leaves[:k]), naive_root(leaves[k:])]
    return [*naive_path(m - k, leaves[k:]), naive_root(leaves[:k])]


def naive_subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [naive_root(leaves)]
    k = _split(n)
    if m <= k:
        return [*naive_subproof(m, leaves[:k], complete), naive_root(leaves[k:])]
    return [*naive_subproof(m - k, leaves[k:], False), naive_root(leaves[:k])]


# --- helpers --------------------------------------------------------------------


def make_leaves(size: int, salt: int = 0) -> list[bytes]:
    return [leaf_hash(f"entry {salt}/{i}".encode()) for i in range(size)]


def build(leaves: Sequence[bytes], split: int | None = None) -> MemoryNodes:
    """Append leaves one by one: `append_nodes` up to ``split``, then `CompactRange`."""
    store = MemoryNodes()
    split = len(leaves) if split is None else split
    for size, leaf in enumerate(leaves[:split]):
        store.add(append_nodes(size, leaf, store))
    frontier = CompactRange.from_reader(split, store)
    for leaf in leaves[split:]:
        store.add(frontier.append(leaf))
    return store


class CountingReader:
    """Wraps a store and records each batch, to check one read per operation."""

    def __init__(self, inner: MemoryNodes) -> None:
        self.inner = inner
        self.calls: list[list[NodeKey]] = []

    def get_nodes(self, keys: Sequence[NodeKey]) -> Mapping[NodeKey, bytes]:
        self.calls.append(list(keys))
        return self.inner.get_nodes(keys)


def flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


# Trees cached by size: hypothesis draws many pairs inside the same tree.
_TREES: dict[int, tuple[list[bytes], MemoryNodes]] = {}


def tree(size: int) -> tuple[list[bytes], MemoryNodes]:
    if size not in _TREES:
        leaves = make_leaves(size)
        _TREES[size] = (leaves, build(leaves))
    return _TREES[size]


sizes = st.integers(min_value=1, max_value=MAX_SIZE)


@st.composite
def index_in_tree(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(sizes)
    return draw(st.integers(min_value=0, max_value=size - 1)), size


@st.composite
def size_pairs(draw: st.DrawFn) -> tuple[int, int]:
    new = draw(sizes)
    return draw(st.integers(min_value=1, max_value=new)), new


# --- hashing ----------------------------------------------------------------------


def test_hash_domain_separation_known_answers() -> None:
    # RFC 6962 reference values: SHA-256("") and SHA-256(0x00).
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"").hex() == ("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    left, right = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(left, right) != node_hash(right, left)
    assert node_hash(left, right) != leaf_hash(left + right)


# --- building ---------------------------------------------------------------------


@PROPERTY
@given(size=st.integers(min_value=0, max_value=MAX_SIZE), data=st.data())
def test_appends_match_naive_root(size: int, data: st.DataObject) -> None:
    leaves = make_leaves(size, salt=size)
    split = data.draw(st.integers(min_value=0, max_value=size), label="split")
    store = build(leaves, split)
    # Only perfect nodes are stored: 2n - popcount(n) of them.
    assert len(store) == 2 * size - size.bit_count()
    assert root_at(size, store) == naive_root(leaves)
    assert CompactRange.from_reader(size, store).root() == naive_root(leaves)
    # The store for n leaves holds every earlier tree too.
    earlier = data.draw(st.integers(min_value=0, max_value=size), label="earlier")
    assert root_at(earlier, store) == naive_root(leaves[:earlier])


@PROPERTY
@given(size=st.integers(min_value=0, max_value=64))
def test_compact_range_root_after_every_append(size: int) -> None:
    store = MemoryNodes()
    frontier = CompactRange()
    leaves = make_leaves(size)
    for count, leaf in enumerate(leaves, start=1):
        created = frontier.append(leaf)
        assert created == append_nodes(count - 1, leaf, store)
        store.add(created)
        assert frontier.size == count
        assert frontier.root() == root_at(count, store) == naive_root(leaves[:count])


def test_append_reads_once() -> None:
    leaves = make_leaves(200)
    store = build(leaves[:127])
    reader = CountingReader(store)
    # 127 = 0b1111111: the 128th leaf completes seven levels at once.
    created = append_nodes(127, leaves[127], reader)
    assert len(reader.calls) == 1
    assert [(lvl, idx) for lvl, idx, _ in created] == [(lvl, 127 >> lvl) for lvl in range(8)]

    reader.calls.clear()
    frontier = CompactRange.from_reader(127, reader)
    for leaf in leaves[127:]:
        store.add(frontier.append(leaf))
    assert len(reader.calls) == 1
    assert frontier.root() == naive_root(leaves)


def test_compact_range_rejects_inconsistent_frontier() -> None:
    with pytest.raises(ValueError):
        CompactRange(3, [leaf_hash(b"x")])  # size 3 needs two hashes
    with pytest.raises(ValueError):
        CompactRange(1, [b"short"])
    with pytest.raises(ValueError):
        CompactRange().append(b"not a hash")


def test_memory_nodes_refuses_rewrite() -> None:
    store = MemoryNodes([(0, 0, leaf_hash(b"a"))])
    store.add([(0, 0, leaf_hash(b"a"))])  # idempotent
    with pytest.raises(ValueError):
        store.add([(0, 0, leaf_hash(b"b"))])


def test_missing_nodes_are_reported() -> None:
    leaves = make_leaves(10)
    store = build(leaves[:5])
    with pytest.raises(MissingNodeError) as caught:
        root_at(10, store)
    assert (1, 4) in caught.value.keys
    with pytest.raises(MissingNodeError):
        inclusion_proof(0, 10, store)
    with pytest.raises(MissingNodeError):
        CompactRange.from_reader(7, store)


def test_empty_tree() -> None:
    store = MemoryNodes()
    assert root_at(0, store) == EMPTY_ROOT
    assert CompactRange().root() == EMPTY_ROOT
    assert consistency_proof(0, 0, store) == []
    verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)


def test_argument_errors() -> None:
    _, store = tree(8)
    with pytest.raises(ValueError):
        inclusion_proof(8, 8, store)
    with pytest.raises(ValueError):
        inclusion_proof(-1, 8, store)
    with pytest.raises(ValueError):
        consistency_proof(5, 4, store)
    with pytest.raises(ValueError):
        consistency_proof(0, 4, store)  # RFC 9162 has no proof from the empty tree
    with pytest.raises(ValueError):
        root_at(-1, store)


# --- inclusion --------------------------------------------------------------------


@PROPERTY
@given(case=index_in_tree())
def test_inclusion_proof_matches_rfc_and_verifies(case: tuple[int, int]) -> None:
    index, size = case
    leaves, store = tree(size)
    reader = CountingReader(store)
    proof = inclusion_proof(index, size, reader)
    assert len(reader.calls) == (1 if size > 1 else 0)  # a one-leaf tree needs no nodes
    assert proof == naive_path(index, leaves[:size])
    verify_inclusion(index, size, leaves[index], proof, root_at(size, store))


@PROPERTY
@given(case=index_in_tree(), data=st.data())
def test_inclusion_mutations_fail(case: tuple[int, int], data: st.DataObject) -> None:
    index, size = case
    leaves, store = tree(size)
    proof = inclusion_proof(index, size, store)
    root = root_at(size, store)

    with pytest.raises(ProofError):
        verify_inclusion(index, size, flip(leaves[index], 0), proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaves[index], proof, flip(root, 31))
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaves[index], [*proof, leaves[0]], root)
    if proof:
        which = data.draw(st.integers(0, len(proof) - 1), label="element")
        byte = data.draw(st.integers(0, 31), label="byte")
        mutated = list(proof)
        mutated[which] = flip(mutated[which], byte)
        with pytest.raises(ProofError):
            verify_inclusion(index, size, leaves[index], mutated, root)
        with pytest.raises(ProofError):
            verify_inclusion(index, size, leaves[index], proof[:which] + proof[which + 1 :], root)
    if size > 1:
        other = data.draw(st.integers(0, size - 1).filter(lambda i: i != index), label="index")
        with pytest.raises(ProofError):
            verify_inclusion(other, size, leaves[index], proof, root)
    # Another size, with that size's genuine root: the proof must not transfer.
    _, bigger_store = tree(MAX_SIZE)
    wrong_size = data.draw(st.integers(index + 1, MAX_SIZE).filter(lambda s: s != size), label="size")
    with pytest.raises(ProofError):
        verify_inclusion(index, wrong_size, leaves[index], proof, root_at(wrong_size, bigger_store))
    with pytest.raises(ProofError):
        verify_inclusion(size, size, leaves[index], proof, root)


def test_inclusion_verifier_edges() -> None:
    leaves, _ = tree(1)
    verify_inclusion(0, 1, leaves[0], [], leaves[0])
    with pytest.raises(ProofError, match="not below"):
        verify_inclusion(0, 0, leaves[0], [], EMPTY_ROOT)
    with pytest.raises(ProofError, match="negative"):
        verify_inclusion(-1, 1, leaves[0], [], leaves[0])
    with pytest.raises(ProofError, match="32 bytes"):
        verify_inclusion(0, 1, leaves[0][:31], [], leaves[0])
    with pytest.raises(ProofError, match="32 bytes"):
        verify_inclusion(0, 2, leaves[0], [b""], leaves[0])


# --- consistency ------------------------------------------------------------------


@PROPERTY
@given(case=size_pairs())
def test_consistency_proof_matches_rfc_and_verifies(case: tuple[int, int]) -> None:
    old, new = case
    leaves, store = tree(new)
    reader = CountingReader(store)
    proof = consistency_proof(old, new, reader)
    assert len(reader.calls) <= 1  # none at all when old == new
    assert proof == naive_subproof(old, leaves, True)
    verify_consistency(old, new, proof, root_at(old, store), root_at(new, store))


@PROPERTY
@given(case=size_pairs(), data=st.data())
def test_consistency_mutations_fail(case: tuple[int, int], data: st.DataObject) -> None:
    old, new = case
    leaves, store = tree(new)
    proof = consistency_proof(old, new, store)
    root1, root2 = root_at(old, store), root_at(new, store)

    with pytest.raises(ProofError):
        verify_consistency(old, new, proof, flip(root1, 0), root2)
    with pytest.raises(ProofError):
        verify_consistency(old, new, proof, root1, flip(root2, 0))
    with pytest.raises(ProofError):
        verify_consistency(old, new, [*proof, leaves[0]], root1, root2)
    if old != new:
        with pytest.raises(ProofError):
            verify_consistency(new, old, proof, root2, root1)
    if proof:
        which = data.draw(st.integers(0, len(proof) - 1), label="element")
        byte = data.draw(st.integers(0, 31), label="byte")
        mutated = list(proof)
        mutated[which] = flip(mutated[which], byte)
        with pytest.raises(ProofError):
            verify_consistency(old, new, mutated, root1, root2)
        with pytest.raises(ProofError):
            verify_consistency(old, new, proof[:which] + proof[which + 1 :], root1, root2)
    # Other sizes, each with its genuine root: a proof is bound to its sizes.
    _, big = tree(MAX_SIZE)
    if new > 1:
        other_old = data.draw(st.integers(1, new).filter(lambda s: s != old), label="old")
        with pytest.raises(ProofError):
            verify_consistency(other_old, new, proof, root_at(other_old, big), root2)
    other_new = data.draw(st.integers(old, MAX_SIZE).filter(lambda s: s != new), label="new")
    with pytest.raises(ProofError):
        verify_consistency(old, other_new, proof, root1, root_at(other_new, big))


def test_consistency_verifier_edges() -> None:
    leaves, store = tree(4)
    root1, root4 = root_at(1, store), root_at(4, store)
    verify_consistency(4, 4, [], root4, root4)
    with pytest.raises(ProofError, match="empty"):
        verify_consistency(4, 4, [leaves[0]], root4, root4)
    with pytest.raises(ProofError):
        verify_consistency(0, 0, [], root1, root1)  # size 0 must carry the empty root
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 4, [], EMPTY_ROOT, root4)
    with pytest.raises(ProofError, match="empty"):
        verify_consistency(1, 4, [], root1, root4)
    with pytest.raises(ProofError, match="exceeds"):
        verify_consistency(4, 1, [], root4, root1)
    with pytest.raises(ProofError, match="32 bytes"):
        verify_consistency(1, 4, [b"x"], root1, root4)


def test_exhaustive_small_trees() -> None:
    # Every index and size pair up to 40 leaves, deterministically, so an
    # off-by-one at a power-of-two boundary cannot hide from the sampler.
    leaves, store = tree(40)
    roots = [root_at(size, store) for size in range(41)]
    for new in range(1, 41):
        assert roots[new] == naive_root(leaves[:new])
        for index in range(new):
            proof = inclusion_proof(index, new, store)
            assert proof == naive_path(index, leaves[:new])
            verify_inclusion(index, new, leaves[index], proof, roots[new])
        for old in range(1, new + 1):
            proof = consistency_proof(old, new, store)
            assert proof == naive_subproof(old, leaves[:new], True)
            verify_consistency(old, new, proof, roots[old], roots[new])
