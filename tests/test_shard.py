import pytest

from exo_core.models.shard import Shard


def test_whole_shard_is_first_and_last():
    s = Shard.whole("m", 30)
    assert (s.start_layer, s.end_layer, s.n_layers) == (0, 29, 30)
    assert s.is_first and s.is_last and s.is_whole
    assert s.layer_count == 30
    assert list(s.layers) == list(range(30))


def test_middle_shard():
    s = Shard("m", 10, 19, 30)
    assert not s.is_first and not s.is_last and not s.is_whole
    assert s.layer_count == 10
    assert str(s) == "m[10-19/30]"


@pytest.mark.parametrize("start,end,n", [(-1, 3, 10), (5, 4, 10), (0, 10, 10), (0, 0, 0)])
def test_invalid_shards_are_refused(start, end, n):
    with pytest.raises(ValueError):
        Shard("m", start, end, n)


def test_overlaps():
    a, b, c = Shard("m", 0, 14, 30), Shard("m", 14, 29, 30), Shard("m", 15, 29, 30)
    assert a.overlaps(b) and b.overlaps(a)
    assert not a.overlaps(c)
    assert not a.overlaps(Shard("other", 0, 14, 30))


def test_dict_round_trip_and_hashable():
    s = Shard("m", 3, 7, 12)
    assert Shard.from_dict(s.to_dict()) == s
    assert len({s, Shard("m", 3, 7, 12)}) == 1
