"""Source adapters on hand-written excerpts of the public formats (tests/data_catalog/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog.adapters import ADAPTERS, LaionFilter, ManifestError, ManifestOptions, build_manifest

FIXTURES = Path(__file__).parent / "fixtures"
SBU = [
    FIXTURES / "SBU_captioned_photo_dataset_urls.txt",
    FIXTURES / "SBU_captioned_photo_dataset_captions.txt",
]


def rows(report) -> list[dict]:
    return pa.concat_tables([pq.read_table(p) for p in report.parts]).to_pylist()


def test_coco_captions_one_row_per_image_with_all_captions(tmp_path):
    report = build_manifest("coco", [FIXTURES / "captions_val2014_mini.json"], tmp_path / "m")
    got = {r["coco_id"]: r for r in rows(report)}
    assert set(got) == {391895, 522418}
    assert got[391895]["url"] == "http://images.cocodataset.org/val2014/COCO_val2014_000000391895.jpg"
    assert got[391895]["caption"] == "A man with a red helmet on a small moped on a dirt road."
    assert len(json.loads(got[391895]["captions"])) == 2
    # no coco_url: falls back to flickr_url; the blank caption is not among the captions
    assert got[522418]["url"].startswith("http://farm1.staticflickr.com/")
    assert json.loads(got[522418]["captions"]) == ["A woman wearing a net on her head cutting a cake."]
    assert report.dropped == {"bad_scheme": 1, "duplicate_url": 1, "empty_caption": 1}
    assert (report.n_in, report.n_out) == (5, 2)


def test_coco_base_url_builds_urls_from_file_name(tmp_path):
    options = ManifestOptions(base_url="http://127.0.0.1:8000/val2014/", allow_loopback=True)
    report = build_manifest(
        "coco", [FIXTURES / "captions_val2014_mini.json"], tmp_path / "m", options=options
    )
    urls = {r["coco_id"]: r["url"] for r in rows(report)}
    assert urls[184613] == "http://127.0.0.1:8000/val2014/COCO_val2014_000000184613.jpg"
    assert "empty_caption" in report.dropped and "bad_scheme" not in report.dropped


def test_karpathy_selects_splits_and_joins_filepath(tmp_path):
    options = ManifestOptions(base_url="http://host/coco", splits=("train", "restval"))
    report = build_manifest(
        "karpathy", [FIXTURES / "dataset_coco_mini.json"], tmp_path / "m", options=options
    )
    got = {r["coco_id"]: r for r in rows(report)}
    assert set(got) == {522418, 57870}
    assert got[57870]["url"] == "http://host/coco/train2014/COCO_train2014_000000057870.jpg"
    assert got[57870]["split"] == "train" and got[57870]["karpathy_imgid"] == 2
    assert json.loads(got[57870]["captions"])[1] == "A long restaurant table with rattan rounded back chairs."


def test_karpathy_without_base_url_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="base_url"):
        build_manifest("karpathy", [FIXTURES / "dataset_coco_mini.json"], tmp_path / "m")


def test_visual_genome_joins_image_data_for_urls(tmp_path):
    inputs = [FIXTURES / "region_descriptions_mini.json", FIXTURES / "image_data_mini.json"]
    report = build_manifest("vg", inputs, tmp_path / "m")
    got = {r["vg_image_id"]: r for r in rows(report)}
    assert set(got) == {1, 2}
    assert got[1]["url"] == "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg"
    # image 2's first region has an empty phrase: its caption comes from the next region
    assert (got[2]["caption"], got[2]["region_id"], got[2]["coco_id"]) == ("walk sign is lit up", 2002, 1234)
    boxes = json.loads(got[1]["regions"])
    assert boxes[0] == {"region_id": 1382, "phrase": "the clock is green in colour", "x": 421, "y": 57,
                        "width": 82, "height": 139}  # fmt: skip
    # image 3 has no image_data entry, image 4 only blank phrases
    assert report.dropped == {"no_image_data": 1, "empty_caption": 1}


def test_cc3m_caption_then_url(tmp_path):
    report = build_manifest("cc3m", [FIXTURES / "cc3m_mini.tsv"], tmp_path / "m")
    got = rows(report)
    assert [r["sample_id"] for r in got] == [0, 1, 6]
    assert got[0]["caption"] == "a very typical bus station"
    assert got[2]["url"] == "https://i.pinimg.com/736x/66/01/6c/66016c3ba27c0e04f39e2bd81a934e3e.jpg"
    assert report.dropped == {"bad_scheme": 1, "duplicate_url": 1, "empty_caption": 1, "malformed_line": 1}


def test_cc12m_url_then_caption_keeps_tabs_in_captions(tmp_path):
    report = build_manifest("cc12m", [FIXTURES / "cc12m_mini.tsv"], tmp_path / "m")
    got = {r["sample_id"]: r for r in rows(report)}
    assert got[1]["caption"] == "a red fox\tsitting in snow"
    assert got[3]["url"] == "HTTPS://EXAMPLE.COM/UPPER.JPG"  # the scheme is case-insensitive
    assert report.dropped == {"bad_scheme": 1}


def test_tsv_in_the_other_column_order_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"cc12m_mini.tsv: expected caption<TAB>url"):
        build_manifest("cc3m", [FIXTURES / "cc12m_mini.tsv"], tmp_path / "m")


def test_sbu_line_aligned_files(tmp_path):
    report = build_manifest("sbu", SBU, tmp_path / "m")
    got = rows(report)
    assert got[0] == {
        "url": "http://static.flickr.com/2723/4385058960_b0f291553e.jpg",
        "caption": "Man sits in a rusted car buried in the sand on Waitarere beach",
        "sample_id": 0,
    }
    assert report.dropped == {"duplicate_url": 1, "empty_caption": 1}


def test_sbu_files_of_different_lengths_are_refused(tmp_path):
    captions = tmp_path / "SBU_captioned_photo_dataset_captions.txt"
    captions.write_text("only one caption\n")
    with pytest.raises(ManifestError, match="4 lines but .* has 1"):
        build_manifest("sbu", [SBU[0], captions], tmp_path / "m")


def test_sbu_parquet_variant(tmp_path):
    src = tmp_path / "sbu.parquet"
    pq.write_table(pa.table({"image_url": ["http://a/1.jpg", "http://a/2.jpg"], "user_id": ["u1", "u2"],
                             "caption": ["one", "two"]}), src)  # fmt: skip
    got = rows(build_manifest("sbu_parquet", [src], tmp_path / "m"))
    assert got == [
        {"url": "http://a/1.jpg", "caption": "one", "user_id": "u1", "sample_id": 0},
        {"url": "http://a/2.jpg", "caption": "two", "user_id": "u2", "sample_id": 1},
    ]


def laion_file(path: Path) -> Path:
    pq.write_table(
        pa.table({
            "SAMPLE_ID": [10, 11, 12, 13, 14, 15],
            "URL": [f"http://laion/{i}.jpg" for i in range(6)],
            "TEXT": ["keep", "low sim", "unsafe", "watermark", "small", "wide"],
            "WIDTH": [512, 512, 512, 512, 100, 2000],
            "HEIGHT": [512, 512, 512, 512, 512, 300],
            "similarity": [0.35, 0.20, 0.40, 0.40, 0.40, 0.40],
            "punsafe": [0.01, 0.01, 0.90, 0.01, 0.01, 0.01],
            "pwatermark": [0.1, 0.1, 0.1, 0.95, 0.1, 0.1],
        }),
        path,
    )  # fmt: skip
    return path


def test_laion_filter_counts_each_criterion(tmp_path):
    f = LaionFilter(
        min_similarity=0.28, max_punsafe=0.5, max_pwatermark=0.8, min_side=256, max_aspect_ratio=3
    )
    options = ManifestOptions(laion_filter=f)
    report = build_manifest("laion", [laion_file(tmp_path / "l.parquet")], tmp_path / "m", options=options)
    got = rows(report)
    assert [(r["sample_id"], r["caption"], r["similarity"]) for r in got] == [(10, "keep", 0.35)]
    assert report.dropped == {
        "low_similarity": 1,
        "unsafe": 1,
        "watermark": 1,
        "too_small": 1,
        "bad_aspect_ratio": 1,
    }


def test_laion_without_filter_keeps_all_and_needs_no_scores(tmp_path):
    src = tmp_path / "l.parquet"
    pq.write_table(pa.table({"URL": ["http://x/1.jpg"], "TEXT": ["a"]}), src)
    assert build_manifest("laion", [src], tmp_path / "m").n_out == 1
    with pytest.raises(ManifestError, match=r"l.parquet: missing required column\(s\) \['similarity'\]"):
        build_manifest(
            "laion", [src], tmp_path / "m2", options=ManifestOptions(laion_filter=LaionFilter(0.3))
        )


def test_generic_csv_with_column_mapping_and_local_urls(tmp_path):
    options = ManifestOptions(url_column="image_url", caption_column="text", allow_local=True)
    report = build_manifest("csv", [FIXTURES / "generic_mini.csv"], tmp_path / "m", options=options)
    got = rows(report)
    assert [r["key"] for r in got] == [1, 2, 4]
    assert got[1]["url"] == "file:///data/images/b.jpg"
    assert got[2]["caption"] == 'a dog says "woof"'
    assert report.dropped == {"empty_caption": 1}


def test_file_urls_are_bad_scheme_unless_allowed(tmp_path):
    options = ManifestOptions(url_column="image_url", caption_column="text", keep_columns=("key",))
    report = build_manifest("csv", [FIXTURES / "generic_mini.csv"], tmp_path / "m", options=options)
    assert report.dropped == {"bad_scheme": 1, "empty_caption": 1}
    assert set(pq.read_schema(report.parts[0]).names) == {"url", "caption", "key"}


def test_generic_jsonl(tmp_path):
    report = build_manifest("jsonl", [FIXTURES / "generic_mini.jsonl"], tmp_path / "m")
    assert [r["image_id"] for r in rows(report)] == [10, 11]
    assert report.dropped == {"bad_scheme": 1, "missing_url": 1}


def test_generic_parquet_keeps_other_columns(tmp_path):
    src = tmp_path / "urls.parquet"
    pq.write_table(
        pa.table({"url": ["http://h/a.jpg", "http://h/a.jpg"], "caption": ["a", "b"], "image_id": [1, 2]}),
        src,
    )
    report = build_manifest("parquet", [src], tmp_path / "m")
    assert rows(report) == [{"url": "http://h/a.jpg", "caption": "a", "image_id": 1}]
    assert report.dropped == {"duplicate_url": 1}


@pytest.mark.parametrize(
    ("fmt", "content", "message"),
    [
        ("csv", "link,caption\nhttp://a/1.jpg,x\n", r"bad.csv: missing required column\(s\) \['url'\]"),
        ("jsonl", '{"url": "http://a/1.jpg"}\n', r"bad.jsonl: missing required column\(s\) \['caption'\]"),
        (
            "coco",
            '{"images": []}',
            r"bad.coco: the top-level object is missing required field\(s\) \['annotations'\]",
        ),
        (
            "coco",
            '{"images": [{"id": 1}], "annotations": [{"image_id": 1}]}',
            r"annotations\[0\].*\['caption'\]",
        ),
        (
            "karpathy",
            '{"images": [{"filename": "a.jpg", "split": "train"}]}',
            r"images\[0\].*\['sentences'\]",
        ),
    ],
)
def test_missing_fields_name_the_file_and_field(tmp_path, fmt, content, message):
    src = tmp_path / f"bad.{fmt}"
    src.write_text(content)
    with pytest.raises(ManifestError, match=message):
        build_manifest(fmt, [src], tmp_path / "m", options=ManifestOptions(base_url="http://h/"))


def test_a_manifest_that_would_be_empty_is_an_error_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "m"
    first = build_manifest("cc12m", [FIXTURES / "cc12m_mini.tsv"], out)
    bad = tmp_path / "bad.tsv"
    bad.write_text("ftp://a/1.jpg\tx\nhttp://a/2.jpg\t  \n")
    with pytest.raises(ManifestError, match=r"no row survived .*'bad_scheme': 1, 'empty_caption': 1"):
        build_manifest("cc12m", [bad], out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-00000.parquet"]
    assert rows(first) == rows(build_manifest("cc12m", [FIXTURES / "cc12m_mini.tsv"], tmp_path / "again"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_parts_are_bounded_and_a_rebuild_replaces_them_whole(tmp_path):
    src = tmp_path / "urls.jsonl"
    src.write_text(
        "".join(json.dumps({"url": f"http://h/{i}.jpg", "caption": f"c{i}"}) + "\n" for i in range(7))
    )
    out = tmp_path / "m"
    report = build_manifest("jsonl", [src], out, options=ManifestOptions(part_rows=3, batch_rows=2))
    assert [pq.read_metadata(p).num_rows for p in report.parts] == [3, 3, 1]
    assert json.loads((out / "manifest.json").read_text())["n_out"] == 7
    src.write_text(json.dumps({"url": "http://h/new.jpg", "caption": "new"}) + "\n")
    report = build_manifest("jsonl", [src], out, options=ManifestOptions(part_rows=3))
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet"]
    assert rows(report) == [{"url": "http://h/new.jpg", "caption": "new"}]


def test_duplicates_are_found_across_batches_and_files(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text("http://h/1.jpg\tone\nhttp://h/2.jpg\ttwo\nhttp://h/1.jpg\tagain\n")
    b.write_text("http://h/2.jpg\ttwo again\nhttp://h/3.jpg\tthree\n")
    report = build_manifest("cc12m", [a, b], tmp_path / "m", options=ManifestOptions(batch_rows=1))
    assert [r["caption"] for r in rows(report)] == ["one", "two", "three"]
    assert report.dropped == {"duplicate_url": 2}


def test_inputs_inside_the_out_dir_and_unknown_formats_are_refused(tmp_path):
    src = tmp_path / "m" / "urls.tsv"
    src.parent.mkdir()
    src.write_text("http://h/1.jpg\tone\n")
    with pytest.raises(ManifestError, match="inside the manifest folder"):
        build_manifest("cc12m", [src], tmp_path / "m")
    with pytest.raises(ManifestError, match="unknown source format 'flickr'"):
        build_manifest("flickr", [src], tmp_path / "out")
    with pytest.raises(ManifestError, match="missing.tsv: input file does not exist"):
        build_manifest("cc12m", [tmp_path / "missing.tsv"], tmp_path / "out")
    assert {"coco", "karpathy", "vg", "cc3m", "cc12m", "sbu", "laion", "csv", "parquet", "jsonl"} <= set(
        ADAPTERS
    )
