"""The analysis command (analysis.py): rank and row entropy of the four attention maps."""

import math

import pytest

import analysis

MAPS = ("softmax", "vanilla linear", "focused linear", "focused linear + DWC")


def test_analysis_ranks_and_entropies():
    rows = analysis.analyse(grid=(5, 7), head_dim=4, num_heads=2, seed=0)
    case = "[grid 5x7, 2 heads of d = 4, seed=0]"
    by_name = {r.name: r for r in rows}
    N, d = 35, 4
    assert set(by_name) == set(MAPS), f"{case}: maps {sorted(by_name)}"
    assert by_name["softmax"].rank == N, f"{case}: softmax rank {by_name['softmax'].rank}, not {N}"
    for name in ("vanilla linear", "focused linear"):
        assert by_name[name].rank <= d, f"{case}: {name} rank {by_name[name].rank} above d = {d}"
    dwc = by_name["focused linear + DWC"].rank
    assert dwc == N, f"{case}: focused linear + DWC rank {dwc}, not {N}"
    for r in rows:
        assert 0 <= r.entropy <= math.log(N) + 1e-9, \
            f"{case}: {r.name} entropy {r.entropy} outside [0, log {N}]"


def test_analysis_command_prints_table(capsys):
    analysis.main(["--grid", "4", "5", "--head-dim", "3", "--heads", "1"])
    out = capsys.readouterr().out
    for name in (*MAPS, "rank", "entropy"):
        assert name in out, f"[--grid 4 5 --head-dim 3 --heads 1]: '{name}' missing from:\n{out}"


@pytest.mark.parametrize("argv, needle", [
    (["--grid", "0", "0"], "--grid 0 0: expected two positive whole numbers"),
    (["--grid", "5", "-3"], "--grid 5 -3: expected two positive whole numbers"),
    (["--grid", "a", "3"], "argument --grid: invalid int value: 'a'"),
    (["--heads", "0"], "--heads 0: expected a positive whole number"),
    (["--head-dim", "-1"], "--head-dim -1: expected a positive whole number"),
    (["--focusing-factor", "nan"], "--focusing-factor nan: expected a finite number > 0"),
    (["--focusing-factor", "-2"], "--focusing-factor -2: expected a finite number > 0"),
    (["--kernel-size", "4"], "--kernel-size 4: expected an odd positive whole number"),
    (["--grid", "400", "400"], "--grid 400 400: the maps would need about"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    """As bench.py: one line on stderr (no usage block, no traceback), exit status 2, nothing
    computed or printed."""
    with pytest.raises(SystemExit) as exc:
        analysis.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, f"{argv}: exit status {exc.value.code}"
    assert err.count("\n") == 1 and err.startswith("analysis.py: error: "), f"{argv}: {err!r}"
    assert needle in err and not out, f"{argv}: stderr {err!r}, stdout {out!r}"
