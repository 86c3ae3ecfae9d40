from mmfuse.progress import progress


def test_without_a_terminal_progress_is_plain_lines_with_rate_and_postfix(capsys):
    bar = progress(3, "pretrain", "step")
    for _ in range(3):
        bar.update()
        bar.set_postfix(loss="0.5000", refresh=False)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert lines[0].startswith("pretrain: 0/3 step (0%)")
    assert lines[-1].startswith("pretrain: 3/3 step (100%)") and "step/s" in lines[-1] and "loss=0.5000" in lines[-1]
    assert len(lines) <= 3  # a line per LINE_SECONDS, not a redraw per update


def test_a_disabled_bar_prints_nothing(capsys):
    for _ in progress(5, "synth", "sample", disable=True, iterable=range(5)):
        pass
    assert capsys.readouterr().err == ""
