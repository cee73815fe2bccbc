import pytest

from eegfast.data.labels import Event, LabelRules, infer_subject, read_label_table


@pytest.mark.parametrize(
    ("path", "subject"),
    [
        ("/d/S001/S001R04.edf", "S001"),
        ("/d/Subject07_2.edf", "Subject07"),
        ("/bids/sub-03/eeg/sub-03_task-rest_eeg.edf", "sub-03"),
        ("/tuh/aaaaaaab_s001_t000.edf", "aaaaaaab"),
        ("/d/recording.edf", "recording"),
    ],
)
def test_infer_subject(path, subject):
    assert infer_subject(path)[0] == subject


def test_subject_regex_wins():
    assert infer_subject("/x/patient12/run1.edf", r"patient(\d+)") == ("12", "subject_regex")


def test_annotations_to_events():
    rules = LabelRules()
    ann = [(0.0, 4.2, "T0"), (4.2, 4.1, "T1"), (8.3, 0.0, "T2"), (9.0, 1.0, "BAD_blink")]
    r = rules.resolve("/d/S001R04.edf", ann)
    assert r.source == "annotations" and r.subject == "S001"
    assert [(e.onset, e.label) for e in r.events] == [(0.0, "T0"), (4.2, "T1")]
    mapped = LabelRules(event_map={"T1": "left", "T2": "right"}).resolve("/d/S001R04.edf", ann)
    assert [e.label for e in mapped.events] == ["left"]


def test_filename_rules():
    rules = LabelRules(filename_rules=(("_1$", "rest"), ("_2$", "task")))
    assert rules.resolve("/d/Subject00_1.edf").label == "rest"
    assert rules.resolve("/d/Subject00_2.edf").label == "task"
    none = rules.resolve("/d/Subject00_3.edf")
    assert none.label == "" and none.source == "none"
    with pytest.raises(ValueError, match="filename rule"):
        LabelRules(filename_rules=(("(", "x"),))


def test_table(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label,subject,session\nrec/a.edf,abnormal,p1,s2\nb.edf,normal,,\n")
    table = read_label_table(csv)
    rules = LabelRules(table=table, filename_rules=(("a$", "ignored"),))
    r = rules.resolve(tmp_path / "rec" / "a.edf", [(0, 5, "T0")])
    assert (r.label, r.subject, r.session, r.source) == ("abnormal", "p1", "s2", "table")
    r = rules.resolve("/elsewhere/b.edf")
    assert (r.label, r.subject, r.subject_source) == (
        "normal",
        "b",
        "file name (each file its own subject)",
    )


def test_table_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,label\nx.edf,1\n")
    with pytest.raises(ValueError, match=r"missing columns \['file'\]"):
        read_label_table(bad)
    with pytest.raises(ValueError, match="labels table"):
        read_label_table(tmp_path / "nope.csv")


def test_table_saved_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts with a UTF-8 byte-order mark."""
    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"\xef\xbb\xbffile,label,subject,session\r\na.edf,rest,p1,1\r\n")
    r = LabelRules(table=read_label_table(csv)).resolve(tmp_path / "a.edf")
    assert (r.label, r.subject, r.source) == ("rest", "p1", "table")


def test_table_rejects_a_repeated_file(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\na.edf,rest\nb.edf,task\n./a.edf,task\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 4: file './a.edf' repeats line 2"):
        read_label_table(csv)


def test_table_problems_name_rows_and_recordings(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "file,label,subject,session\n"
        "Subjct00_1.edf,rest,s0,a\n"  # misspelled
        "Subject00_2.edf,,s0,a\n"  # empty label
        "Subject01_1.edf,rest,s1,a\n"
    )
    rules = LabelRules(table=read_label_table(csv))
    recordings = [tmp_path / "rec" / n for n in ("Subject00_1.edf", "Subject00_2.edf")]
    recordings.append(tmp_path / "rec" / "Subject01_1.edf")
    problems = rules.table_problems(recordings)
    assert len(problems) == 3
    assert f"labels table {csv}, line 2: file 'Subjct00_1.edf' matches no recording" in problems
    assert problems[1].startswith(
        f"labels table {csv}, line 3: file 'Subject00_2.edf' has an empty"
    )
    assert "1 recording(s) not in the table" in problems[2]
    assert problems[2].endswith("rec/Subject00_1.edf")
    assert rules.table_problems(recordings[1:]) == problems[:2]  # every recording in the table
    assert LabelRules().table_problems(recordings) == []  # no table, nothing to check


def test_event_duration_gives_onset_markers_a_length():
    """Zero-duration annotations are skipped (and counted for prepare's warning) unless
    event_duration says how long they label; a bad event_duration is refused by name."""
    annotations = [(1.0, 0.0, "T1"), (5.0, 0.0, "T2"), (9.0, 2.0, "T1"), (12.0, 0.0, "BAD x")]
    rules = LabelRules(event_map={"T1": "left", "T2": "right"})
    assert rules.events_from(annotations) == (Event(9.0, 2.0, "left"),)
    assert rules.skipped_onset_markers(annotations) == {"T1": 1, "T2": 1}
    timed = LabelRules(event_map={"T1": "left", "T2": "right"}, event_duration=4)
    assert timed.events_from(annotations) == (
        Event(1.0, 4.0, "left"),
        Event(5.0, 4.0, "right"),
        Event(9.0, 2.0, "left"),
    )
    assert timed.skipped_onset_markers(annotations) == {}
    # BAD marks label nothing; without a map every other description is listed for the user
    assert LabelRules().skipped_onset_markers(annotations) == {"T1": 1, "T2": 1}
    for bad in (0, -1.0, float("nan"), float("inf"), "4", True):
        with pytest.raises(ValueError, match="event_duration must be a positive number"):
            LabelRules(event_duration=bad)


def test_a_table_written_on_windows_names_its_files_everywhere(tmp_path):
    # `sub-01\eeg\a.edf`: one file name with backslashes on Linux and macOS, which matched no
    # recording (prepared unlabelled, with a warning among others)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\nsub-01\\eeg\\a.edf,rest\n", encoding="utf-8")
    rules = LabelRules(table=read_label_table(csv))
    recording = tmp_path / "sub-01" / "eeg" / "a.edf"
    assert rules.resolve(recording).label == "rest"
    assert rules.table_problems([recording]) == []
