"""A shortened `python -m kdops.demo` runs: every method and meta-gradient mode trains, the
table and the plot come out, and the three meta-gradient modes agree."""
from kdops import demo, meta


def test_demo_runs_shortened(tmp_path, capsys):
    out = tmp_path / "demo.png"
    rows = demo.main(["--epochs", "1", "--teacher-epochs", "2", "--out", str(out),
                      "--device", "cpu"])
    assert out.stat().st_size > 10_000
    assert [(m, mode) for m, mode, _, _ in rows[1:]] == demo.RUNS
    assert all(0.5 < acc <= 1.0 for _, _, acc, _ in rows)     # better than chance (0.1)
    for method in ("MetaDistil", "MKD"):
        accs = [acc for m, _, acc, _ in rows if m == method]
        assert len(accs) == len(meta.MODES) and max(accs) - min(accs) <= 0.01
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "finite_difference" in printed
