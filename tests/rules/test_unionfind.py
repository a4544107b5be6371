"""Direct tests of the element-id union-find (onnxslim.graph.unionfind)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxslim.graph.unionfind import UnionFind


def test_fresh_ids_are_consecutive_singletons():
    uf = UnionFind()
    a, b = uf.new(3), uf.new(2)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [3, 4]
    assert uf.size == 5
    assert uf.roots().tolist() == [0, 1, 2, 3, 4]


def test_union_is_elementwise_and_the_smallest_id_is_the_root():
    uf = UnionFind()
    a, b = uf.new(3), uf.new(3)
    uf.union(a, b)  # 0-3, 1-4, 2-5
    assert uf.find(b).tolist() == [0, 1, 2]
    uf.union(np.array([5]), np.array([0]))  # joins the classes {0, 3} and {2, 5}
    assert uf.roots().tolist() == [0, 1, 0, 0, 1, 0]


def test_a_repeated_target_in_one_union_call_unites_everything():
    uf = UnionFind()
    ids = uf.new(4)
    uf.union(ids, np.repeat(ids[:1], 4))  # depthwise-style: all to one representative
    assert set(uf.roots().tolist()) == {0}


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 30).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=40))))
def test_matches_a_naive_partition(case):
    n, pairs = case
    uf = UnionFind()
    uf.new(n)
    classes = [{i} for i in range(n)]
    for a, b in pairs:
        uf.union(np.array([a]), np.array([b]))
        ca = next(c for c in classes if a in c)
        cb = next(c for c in classes if b in c)
        if ca is not cb:
            classes.remove(cb)
            ca |= cb
    roots = uf.roots()
    for members in classes:
        assert {int(roots[m]) for m in members} == {min(members)}
