"""The Ray Data preparation job on the toy world and on broken inputs."""

import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ppd.data.prepare import SPLITS
from ppd_ray.cli.main import app
from ppd_ray.jobs.prepare import run


def _rows(folder):
    files = sorted(folder.glob("*.parquet"))
    return pq.read_table(files).num_rows if files else 0


@pytest.fixture(scope="module")
def broken_inputs(tmp_path_factory, toy_world):
    """A folder mixing one good toy shard with every kind of broken shard."""
    folder = tmp_path_factory.mktemp("broken")
    good = pq.read_table(toy_world / "pairs" / "population")
    pq.write_table(good, folder / "a_good.parquet")
    sample = good.slice(0, 10)
    jpg_0 = sample.column("jpg_0").to_pylist()
    jpg_0[:3] = [b"definitely not an image", b"", jpg_0[3][:20]]  # garbage, empty, truncated
    pq.write_table(
        sample.set_column(sample.schema.get_field_index("jpg_0"), "jpg_0", pa.array(jpg_0, pa.binary())),
        folder / "b_corrupt.parquet",
    )
    pq.write_table(sample.drop_columns(["label_1"]), folder / "c_missing_column.parquet")
    as_text = pa.array([str(u) for u in sample.column("user_id").to_pylist()])
    pq.write_table(
        sample.set_column(sample.schema.get_field_index("user_id"), "user_id", as_text), folder / "d_wrong_type.parquet"
    )
    (folder / "e_empty.parquet").write_bytes(b"")
    ties = sample.set_column(sample.schema.get_field_index("label_0"), "label_0", pa.array([0.5] * 10))
    ties = ties.set_column(ties.schema.get_field_index("label_1"), "label_1", pa.array([0.5] * 10))
    pq.write_table(ties, folder / "f_all_ties.parquet")
    return folder, good


def test_job_accounts_for_every_row_of_broken_inputs(ray_local, broken_inputs, smoke_config, tmp_path, capsys):
    folder, good = broken_inputs
    report = run(smoke_config, folder, tmp_path)
    on_disk = json.loads((tmp_path / "accounting.json").read_text())
    assert on_disk["kept"] == report["kept"]

    assert report["input_rows"] == good.num_rows + 4 * 10  # four 10-row shards; the empty file has no rows
    assert report["input_rows"] == sum(report["kept"].values()) + sum(report["rejected"].values())
    rejected = report["rejected"]
    assert rejected["missing_column"] == 10 and rejected["wrong_type"] == 10
    assert rejected["unreadable_file"] == 0
    assert rejected["undecodable_image"] >= 3  # the three broken rows (plus none of the good ones)
    # exact counts, from the inputs: an identical pair is "not_different" before it can be a "tie"
    ties = pq.read_table(folder / "f_all_ties.parquet")
    expected = {"tie": 0, "not_different": 0}
    for table in (good, ties):
        different = table.column("are_different")
        expected["not_different"] += pc.sum(pc.invert(different)).as_py()
        expected["tie"] += pc.sum(
            pc.and_(different, pc.equal(table.column("label_0"), table.column("label_1")))
        ).as_py()
    assert rejected["tie"] == expected["tie"] and rejected["not_different"] == expected["not_different"]

    problems = {f["path"].rsplit("/", 1)[-1]: f["problem"] for f in report["files"]}
    assert problems == {
        "a_good.parquet": None,
        "b_corrupt.parquet": None,
        "c_missing_column.parquet": "missing_column",
        "d_wrong_type.parquet": "wrong_type",
        "e_empty.parquet": "unreadable_file",
        "f_all_ties.parquet": None,
    }
    err = capsys.readouterr().err
    assert "c_missing_column.parquet" in err and "label_1" in err
    assert "d_wrong_type.parquet" in err and "user_id" in err
    assert "e_empty.parquet" in err and "not a parquet file (0 bytes)" in err
    assert "undecodable_image" in err and "b_corrupt.parquet:0" in err

    # the files on disk hold exactly the kept rows, and rejected.parquet names every rejected row
    for split in SPLITS:
        assert _rows(tmp_path / split) == report["kept"][split]
    listed = pq.read_table(tmp_path / "rejected.parquet").to_pandas()
    assert int(listed["rows"].sum()) == sum(report["rejected"].values())
    corrupt_rows = listed[listed["file"].str.endswith("b_corrupt.parquet")]
    assert {0, 1, 2} <= set(corrupt_rows.loc[corrupt_rows.reason == "undecodable_image", "row_in_file"])


def test_split_files_and_groups_are_consistent(ray_local, toy_world, smoke_config, tmp_path):
    report = run(smoke_config, toy_world / "pairs" / "population", tmp_path)
    tables = {s: pq.read_table(tmp_path / s).to_pandas() for s in SPLITS if report["kept"][s]}
    pair_ids = [p for t in tables.values() for p in t["pair_id"]]
    assert len(pair_ids) == len(set(pair_ids))  # splits disjoint
    for split, table in tables.items():
        assert (table["split"] == split).all()
        kept_labels = table[["label_0", "label_1"]].to_numpy()
        assert ((kept_labels == [1.0, 0.0]) | (kept_labels == [0.0, 1.0])).all(axis=1).all()
        assert ((table["preferred"] == 0) == (table["label_0"] == 1.0)).all()

    groups = pq.read_table(tmp_path / "groups").to_pandas()
    assert len(groups) == sum(report["groups"].values()) > 0
    by_pair = {p: row for t in tables.values() for p, row in zip(t["pair_id"], t.itertuples(), strict=True)}
    for group in groups.itertuples():
        assert len(group.pair_ids) == smoke_config.data.shots
        assert len(group.jpg_0) == len(group.captions) == len(group.preferred) == smoke_config.data.shots
        for pid, caption, jpg_0, preferred in zip(
            group.pair_ids, group.captions, group.jpg_0, group.preferred, strict=True
        ):
            source = by_pair[pid]
            assert source.user_id == group.user_id and source.caption == caption
            assert source.jpg_0 == jpg_0 and source.preferred == preferred
            assert source.context_group_id == group.group_id
    # every conditioned pair points to a group of its own user that does not contain it
    members = dict(zip(groups["group_id"], groups["pair_ids"], strict=True))
    owners = dict(zip(groups["group_id"], groups["user_id"], strict=True))
    for table in tables.values():
        conditioned = table[table["condition_group_id"].notna()]
        assert len(conditioned) > 0
        for pid, uid, gid in zip(
            conditioned["pair_id"], conditioned["user_id"], conditioned["condition_group_id"], strict=True
        ):
            assert pid not in list(members[int(gid)]) and owners[int(gid)] == uid


def test_cli_reports_unusable_input_without_a_traceback(ray_local, broken_inputs, tmp_path):
    folder, _ = broken_inputs
    only_ties = tmp_path / "ties"
    only_ties.mkdir()
    shutil.copy(folder / "f_all_ties.parquet", only_ties)
    runner = CliRunner()
    result = runner.invoke(
        app, ["prepare", "--input", str(only_ties), "--out", str(tmp_path / "out"), "--preset", "smoke"]
    )
    assert result.exit_code == 2
    assert "no usable rows: all 10 input rows were rejected (tie: 10)" in result.output
    assert "Traceback" not in result.output
    assert json.loads((tmp_path / "out" / "accounting.json").read_text())["rejected"]["tie"] == 10

    missing = runner.invoke(app, ["prepare", "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
