import re

import pytest

from megatron_ext.launch.hostlist import expand_hostlist


def test_ranges_and_single_numbers_keep_zero_padding():
    assert expand_hostlist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand_hostlist("gpu[098-101]") == ["gpu098", "gpu099", "gpu100", "gpu101"]


def test_plain_names_and_several_entries():
    assert expand_hostlist("login1") == ["login1"]
    assert expand_hostlist("a[1-2],b7,c[3]") == ["a1", "a2", "b7", "c3"]


def test_several_brackets_multiply_out_left_to_right():
    assert expand_hostlist("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]
    assert expand_hostlist("rack[1-2]-gpu") == ["rack1-gpu", "rack2-gpu"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("node[01-04", "never closed"),
        ("node01-04]", "without '['"),
        ("node[04-01]", "runs backwards"),
        ("node[a-b]", "not a number"),
        ("node[[1-2]]", "nested"),
        (" , ", "names no hosts"),
    ],
)
def test_bad_lists_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        expand_hostlist(bad)
