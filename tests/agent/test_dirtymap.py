"""The dirty map against a model (a set of block numbers), and split_extents."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.agent.dirtymap import PAGE_BLOCKS, DirtyMap, split_extents

Model = set[int]
Extent = tuple[int, int]

# -- the model ---------------------------------------------------------------------------------------------


def model_mark(model: Model, size: int, g: int, start: int, end: int) -> None:
    end = min(end, size)
    if start < end:
        model.update(range(start // g, (end - 1) // g + 1))


def model_extents(model: Model, size: int, g: int) -> list[Extent]:
    runs: list[list[int]] = []  # [first block, end block)
    for b in sorted(model):
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return [(a * g, min(b * g, size) - a * g) for a, b in runs]


def model_bytes(model: Model, size: int, g: int) -> int:
    last = (size - 1) // g
    return len(model - {last}) * g + (size - last * g if last in model else 0)


def extent_blocks(extents: list[Extent], size: int, g: int) -> Model:
    out: Model = set()
    for off, length in extents:
        model_mark(out, size, g, off, off + length)
    return out


# -- strategies --------------------------------------------------------------------------------------------

GRANULARITIES = (512, 4096, 65536)


@st.composite
def disks(draw: st.DrawFn) -> tuple[int, int]:
    """(size, granularity): up to two bitmap pages, the size mostly not a multiple of the granularity."""
    g = draw(st.sampled_from(GRANULARITIES))
    pages = draw(st.integers(0, 1))
    blocks = pages * PAGE_BLOCKS + draw(st.sampled_from([0, 1, 2, 7, 100]))
    tail = draw(st.sampled_from([0, 1, 511, g // 2, g - 1]))
    size = blocks * g + tail
    if size == 0:
        size = g + 1
    return size, g


@st.composite
def ranges(draw: st.DrawFn, size: int, g: int) -> tuple[int, int]:
    """A byte range [start, end): anchored near page boundaries, 0, the end of the disk or anywhere; unaligned;
    mostly short, sometimes long (crossing pages), sometimes past the end of the disk or empty."""
    page = PAGE_BLOCKS * g
    anchor = draw(
        st.one_of(
            st.sampled_from([0, size, size - 1]),
            st.integers(0, size // page + 1).map(lambda k: k * page),
            st.integers(0, size),
        )
    )
    start = max(0, anchor + draw(st.integers(-3 * g, 3 * g)))
    length = draw(
        st.one_of(
            st.integers(-2, 4 * g),
            st.integers(0, page + 3 * g),
            st.just(size + g),
        )
    )
    return start, start + length


@st.composite
def disk_and_marks(draw: st.DrawFn, max_marks: int = 8) -> tuple[int, int, list[tuple[int, int]]]:
    size, g = draw(disks())
    marks = draw(st.lists(ranges(size, g), max_size=max_marks))
    return size, g, marks


@st.composite
def two_mark_lists(draw: st.DrawFn, max_second: int) -> tuple[tuple[int, int], list[Extent], list[Extent]]:
    size, g = draw(disks())
    return (size, g), draw(st.lists(ranges(size, g), max_size=6)), draw(st.lists(ranges(size, g), max_size=max_second))


def build(size: int, g: int, marks: list[tuple[int, int]]) -> tuple[DirtyMap, Model]:
    m, model = DirtyMap(size, g), set()
    for a, b in marks:
        m.mark(a, b)
        model_mark(model, size, g, a, b)
    return m, model


def check_against(m: DirtyMap, model: Model) -> None:
    size, g = m.size, m.granularity
    assert bool(m) == bool(model)
    assert m.dirty_blocks == len(model)
    assert m.dirty_bytes == model_bytes(model, size, g)
    ext = m.extents()
    assert ext == model_extents(model, size, g)
    # sorted, merged (never adjacent or overlapping), clipped to the disk, no empty extents
    for (a1, l1), (a2, _) in zip(ext, ext[1:], strict=False):
        assert a1 + l1 < a2
    for off, length in ext:
        assert length > 0 and off % g == 0 and off + length <= size
        assert (off + length) % g == 0 or off + length == size
    assert sum(length for _, length in ext) == m.dirty_bytes


# -- properties --------------------------------------------------------------------------------------------

SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(disk_and_marks())
def test_mark_matches_model(case: tuple[int, int, list[tuple[int, int]]]) -> None:
    size, g, marks = case
    m, model = build(size, g, marks)
    assert m.blocks == -(-size // g)
    check_against(m, model)


@SETTINGS
@given(disk_and_marks())
def test_extents_round_trip_through_mark_extents(case: tuple[int, int, list[tuple[int, int]]]) -> None:
    size, g, marks = case
    m, model = build(size, g, marks)
    again = DirtyMap(size, g)
    again.mark_extents(m.extents())
    check_against(again, model)
    assert again.extents() == m.extents()


@SETTINGS
@given(two_mark_lists(6))
def test_merge_is_union(case: tuple[tuple[int, int], list[tuple[int, int]], list[tuple[int, int]]]) -> None:
    (size, g), marks_a, marks_b = case
    a, model_a = build(size, g, marks_a)
    b, model_b = build(size, g, marks_b)
    extents_b = b.extents()
    a.merge(b)
    check_against(a, model_a | model_b)
    check_against(b, model_b)  # the merged-in map is left alone
    assert b.extents() == extents_b


@SETTINGS
@given(two_mark_lists(4))
def test_intersects(case: tuple[tuple[int, int], list[tuple[int, int]], list[tuple[int, int]]]) -> None:
    (size, g), marks, probes = case
    m, model = build(size, g, marks)
    probe_extents = [(a, b - a) for a, b in probes]
    expected = bool(extent_blocks(probe_extents, size, g) & model)
    assert m.intersects(probe_extents) is expected
    assert m.dirty_blocks == len(model)  # probing does not mark
    if model:
        assert m.intersects(m.extents())


@SETTINGS
@given(disk_and_marks())
def test_clear(case: tuple[int, int, list[tuple[int, int]]]) -> None:
    size, g, marks = case
    m, _ = build(size, g, marks)
    m.clear()
    check_against(m, set())
    assert not m.intersects([(0, size)])
    m.mark(0, 1)
    check_against(m, {0})




# -- edge cases --------------------------------------------------------------------------------------------


def test_empty_map() -> None:
    m = DirtyMap(10 * 4096 + 1)
    assert not m
    assert m.dirty_blocks == 0 and m.dirty_bytes == 0
    assert m.extents() == []
    assert not m.intersects([(0, 10 * 4096 + 1)])
    assert not m.intersects([])


def test_zero_size_disk() -> None:
    m = DirtyMap(0)
    assert m.blocks == 0
    m.mark(0, 4096)
    assert not m and m.dirty_bytes == 0 and m.extents() == []


@pytest.mark.parametrize(("start", "end"), [(0, 0), (4096, 4096), (5000, 4000), (40_961, 50_000), (40_960, 40_961)])
def test_empty_or_outside_ranges_mark_nothing(start: int, end: int) -> None:
    m = DirtyMap(40_960)
    m.mark(start, end)
    assert not m and m.extents() == []


def test_one_byte_marks_whole_block() -> None:
    m = DirtyMap(1 << 20)
    m.mark(4097, 4098)
    assert m.extents() == [(4096, 4096)]
    assert m.dirty_bytes == 4096


def test_range_ending_on_block_boundary_does_not_mark_next() -> None:
    m = DirtyMap(1 << 20)
    m.mark(4095, 8192)
    assert m.extents() == [(0, 8192)]


@pytest.mark.parametrize("g", GRANULARITIES)
@pytest.mark.parametrize("tail", [0, 1, 100])
def test_full_disk_mark(g: int, tail: int) -> None:
    size = 2 * PAGE_BLOCKS * g + 5 * g + tail
    m = DirtyMap(size, g)
    m.mark(0, size)
    assert m.extents() == [(0, size)]
    assert m.dirty_blocks == m.blocks == 2 * PAGE_BLOCKS + 5 + (1 if tail else 0)
    assert m.dirty_bytes == size
    m2 = DirtyMap(size, g)
    m2.mark(0, 1 << 62)  # far past the end: clipped
    assert m2.extents() == [(0, size)]


def test_full_page_then_neighbours_merge_across_pages() -> None:
    g = 4096
    page = PAGE_BLOCKS * g
    m = DirtyMap(3 * page + 1, g)
    m.mark(page, 2 * page)  # exactly page 1
    assert m.extents() == [(page, page)]
    m.mark(page - 1, page)  # last block of page 0
    m.mark(2 * page, 2 * page + 1)  # first block of page 2
    assert m.extents() == [(page - g, page + 2 * g)]


def test_dirty_bytes_counts_short_last_block_only_when_dirty() -> None:
    m = DirtyMap(3 * 4096 + 10)
    m.mark(0, 1)
    assert m.dirty_bytes == 4096
    m.mark(3 * 4096, 3 * 4096 + 1)
    assert m.dirty_bytes == 4096 + 10
    assert m.extents() == [(0, 4096), (3 * 4096, 10)]


def test_dirty_bytes_short_last_block_on_a_later_page() -> None:
    g = 512
    size = PAGE_BLOCKS * g + 3 * g + 7  # the short block is on page 1
    m = DirtyMap(size, g)
    m.mark(size - 1, size)
    assert m.dirty_bytes == 7
    assert m.extents() == [(size - 7, 7)]
    m.mark(0, 1)
    assert m.dirty_bytes == g + 7


@pytest.mark.parametrize("g", [0, -4096, 256, 1000, 1536, 3 * 4096, 4097])
def test_bad_granularity(g: int) -> None:
    with pytest.raises(ValueError):
        DirtyMap(1 << 20, g)


@pytest.mark.parametrize("g", [512, 1024, 4096, 1 << 20])
def test_good_granularity(g: int) -> None:
    m = DirtyMap(5 * g + 1, g)
    assert m.granularity == g and m.blocks == 6


# -- split_extents -----------------------------------------------------------------------------------------


@st.composite
def sorted_extents(draw: st.DrawFn) -> list[Extent]:
    out: list[Extent] = []
    pos = draw(st.integers(0, 10_000))
    for gap, length in draw(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 5000)), max_size=15)):
        pos += gap
        out.append((pos, length))
        pos += length
    return out


def covered(extents: list[Extent]) -> list[int]:
    """Byte offsets as a list of run boundaries: adjacent pieces merged, so a split and its source compare."""
    runs: list[Extent] = []
    for off, length in extents:
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((off, length))
    return [x for off, length in runs for x in (off, off + length)]


@settings(max_examples=150, deadline=None)
@given(sorted_extents(), st.one_of(st.integers(1, 8), st.integers(50, 20_000)))
def test_split_extents(extents: list[Extent], limit: int) -> None:
    groups = split_extents(extents, limit)
    flat = [e for group in groups for e in group]
    total = sum(length for _, length in extents)
    # order kept, pieces positive and non-overlapping, covering exactly the input
    assert all(length > 0 for _, length in flat)
    assert all(a1 + l1 <= a2 for (a1, l1), (a2, _) in zip(flat, flat[1:], strict=False))
    assert covered(flat) == covered(extents)
    assert sum(length for _, length in flat) == total
    # every piece lies inside one input extent
    for off, length in flat:
        assert any(a <= off and off + length <= a + n for a, n in extents)
    # every group is non-empty and within the limit; greedy packing: as few groups as possible
    assert all(group and sum(length for _, length in group) <= limit for group in groups)
    assert len(groups) == -(-total // limit)


def test_split_extents_examples() -> None:
    assert split_extents([], 10) == []
    assert split_extents([(0, 10)], 10) == [[(0, 10)]]
    assert split_extents([(0, 25)], 10) == [[(0, 10)], [(10, 10)], [(20, 5)]]
    assert split_extents([(0, 4), (10, 4), (20, 4)], 10) == [[(0, 4), (10, 4), (20, 2)], [(22, 2)]]
    assert split_extents([(0, 4), (8, 0), (10, 4)], 100) == [[(0, 4), (10, 4)]]  # empty extents vanish
    assert split_extents([(5, 3)], 1) == [[(5, 1)], [(6, 1)], [(7, 1)]]
