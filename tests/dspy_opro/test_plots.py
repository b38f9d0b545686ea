import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dspy_opro.plots import BEST_COLOR, OTHER_COLOR, draw_scores, draw_trajectory, save_figure  # noqa: E402

TRAJECTORY = [
    {"step": 0, "best_score": 20.0, "candidate_scores": []},
    {"step": 1, "best_score": 40.0, "candidate_scores": [40.0, 10.0, None]},
    {"step": 2, "best_score": 40.0, "candidate_scores": [30.0]},
]


def test_trajectory_shows_every_scored_candidate_and_the_best_line():
    fig, ax = plt.subplots()
    draw_trajectory(ax, TRAJECTORY)
    points = [tuple(p) for c in ax.collections for p in c.get_offsets()]
    # step 0 shown by its best score, the unscored candidate (None) left out, equal steps spread apart
    assert sorted(y for _, y in points) == [10.0, 20.0, 30.0, 40.0]
    step1 = sorted(x for x, y in points if y in (10.0, 40.0))
    assert step1[0] < 1.0 < step1[1]
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == [20.0, 40.0, 40.0]
    plt.close(fig)


def test_scores_highlight_the_chosen_rows_and_refuse_no_rows():
    fig, ax = plt.subplots()
    draw_scores(ax, [("baseline", 30.0, False), ("OPRO", 55.0, True)])
    colors = [matplotlib.colors.to_hex(bar.get_facecolor()) for bar in ax.patches]
    assert colors == [OTHER_COLOR, BEST_COLOR]
    assert [bar.get_width() for bar in ax.patches] == [30.0, 55.0]
    with pytest.raises(ValueError, match="at least one row"):
        draw_scores(ax, [])
    plt.close(fig)


def test_save_figure_writes_a_png_in_a_new_folder_and_closes_the_figure(tmp_path):
    fig, ax = plt.subplots()
    draw_trajectory(ax, TRAJECTORY)
    path = save_figure(fig, tmp_path / "new" / "trajectory.png", title="run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig._suptitle.get_text() == "run"
    assert not plt.fignum_exists(fig.number)
