"""Prompt suites: official file formats, the documented COCO caption rule, nested seeded subsets, errors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from prefalign.bench.suites import HPS_STYLES, PromptItem, load_suite, select_prompts
from prefalign.cli import app
from prefalign.errors import PrefalignError
from prefalign.shapes.prompts import prompt_set

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO = SHARED / "data" / "coco" / "captions_val2017.json"


def _coco_file(path: Path) -> Path:
    annotations = [  # image 7 has three captions, given out of annotation-id order
        {"image_id": 7, "id": 30, "caption": "third  caption\n"},
        {"image_id": 3, "id": 1, "caption": "only caption"},
        {"image_id": 7, "id": 10, "caption": "first caption"},
        {"image_id": 7, "id": 20, "caption": "second caption"},
        {"image_id": 5, "id": 2, "caption": "five a"},
        {"image_id": 5, "id": 4, "caption": "five b"},
    ]
    path.write_text(json.dumps({"info": {}, "images": [], "annotations": annotations}))
    return path


def test_coco_one_caption_per_image_by_the_documented_rule(tmp_path):
    path = _coco_file(tmp_path / "captions_val2017.json")
    suite = load_suite("coco-val", path, seed=3)
    assert load_suite("coco-val", tmp_path, seed=3) == suite  # the unzipped annotations/ folder works too
    assert [p.id for p in suite.prompts] == ["coco:3", "coco:5", "coco:7"]  # ascending image id
    by_id = {
        "coco:3": ["only caption"],
        "coco:5": ["five a", "five b"],
        "coco:7": ["first caption", "second caption", "third caption"],
    }  # annotation-id order, spaces collapsed
    for prompt in suite.prompts:
        image_id = int(prompt.id.split(":")[1])
        pick = np.random.default_rng([3, image_id]).integers(len(by_id[prompt.id]))
        assert prompt.text == by_id[prompt.id][pick]
    assert "default_rng([3, image_id])" in suite.rule
    choices = {seed: [p.text for p in load_suite("coco-val", path, seed=seed).prompts] for seed in range(8)}
    assert len({tuple(c) for c in choices.values()}) > 1  # the seed matters
    assert choices[3] == [p.text for p in suite.prompts]  # and fixes the choice


def test_real_coco_val_captions(tmp_path):
    if not COCO.is_file():
        pytest.skip(f"{COCO} not present (../shared is absent)")
    full = load_suite("coco-val", COCO, seed=0)
    assert len(full.prompts) == 5000 and len({p.id for p in full.prompts}) == 5000
    small = load_suite("coco-val", COCO, num_prompts=50, seed=0)
    large = load_suite("coco-val", COCO, num_prompts=500, seed=0)
    assert set(small.prompts) <= set(large.prompts) <= set(full.prompts)  # nested, same caption per image
    captions = {}
    for ann in json.loads(COCO.read_text())["annotations"]:
        captions.setdefault(f"coco:{ann['image_id']}", set()).add(" ".join(ann["caption"].split()))
    assert all(p.text in captions[p.id] for p in large.prompts)


def test_missing_suite_file_is_one_line_saying_how_to_get_it(tmp_path):
    with pytest.raises(PrefalignError, match=r"annotations_trainval2017\.zip"):
        load_suite("coco-val")
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "coco-val",
            "--generator",
            "shapes-ideal",
            "--reward",
            "shapes-oracle",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--captions" in lines[0]
    with pytest.raises(PrefalignError, match="google-research/parti"):
        load_suite("parti", tmp_path / "PartiPrompts.tsv")


def test_parti_tsv_and_drawbench_csv_in_their_published_formats(tmp_path):
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n"
        "a red apple, on a table\tFood & Beverage\tBasic\tnote\n"
    )
    suite = load_suite("parti", parti)
    assert suite.prompts == (
        PromptItem("parti:00000", "bond", "Abstract"),
        PromptItem("parti:00001", "a red apple, on a table", "Food & Beverage"),
    )
    drawbench = tmp_path / "drawbench.csv"
    drawbench.write_text('Prompts,Category\n"A red colored car, parked.",Colors\nA cat.,Counting\n')
    assert [(p.text, p.group) for p in load_suite("drawbench", drawbench).prompts] == [
        ("A red colored car, parked.", "Colors"),
        ("A cat.", "Counting"),
    ]


def test_hps_four_styles_from_the_benchmark_folder(tmp_path):
    folder = tmp_path / "HPDv2" / "benchmark"
    folder.mkdir(parents=True)
    for style in HPS_STYLES:
        (folder / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(3)]))
    for given in (folder, folder.parent):  # the style files' folder, or the dataset root holding benchmark/
        suite = load_suite("hps", given)
        assert len(suite.prompts) == 12 and {p.group for p in suite.prompts} == set(HPS_STYLES)
        assert suite.prompts[4] == PromptItem("hps:concept-art:00001", "concept-art prompt 1", "concept-art")
    (folder / "photo.json").unlink()
    with pytest.raises(PrefalignError, match="photo"):
        load_suite("hps", folder)


def test_pickapic_parquet_reads_unique_captions(tmp_path):
    path = tmp_path / "validation_unique-00000-of-00001.parquet"
    frame = pd.DataFrame(
        {"caption": ["a dog", "a cat", "a dog"], "jpg_0": [b"\x89PNG"] * 3, "label_0": [1.0, 0.0, 0.5]}
    )
    frame.to_parquet(path)
    assert [p.text for p in load_suite("pickapic-val", path).prompts] == ["a dog", "a cat"]


@pytest.mark.parametrize("suffix", ["txt", "csv", "jsonl"])
def test_user_files(tmp_path, suffix):
    path = tmp_path / f"mine.{suffix}"
    texts = ["a, b", "c d"]
    if suffix == "txt":
        path.write_text("a, b\n\nc d\n")
    elif suffix == "csv":
        pd.DataFrame({"id": [1, 2], "Prompt": texts}).to_csv(path, index=False)
    else:
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    assert [p.text for p in load_suite(f"file:{path}").prompts] == texts


def test_shapes_val_and_seeded_nested_subsets():
    full = load_suite("shapes-val")
    assert [p.text for p in full.prompts] == list(prompt_set("val"))
    a = load_suite("shapes-val", num_prompts=10, seed=1).prompts
    b = load_suite("shapes-val", num_prompts=40, seed=1).prompts
    assert set(a) <= set(b) and list(a) == sorted(a, key=full.prompts.index)  # nested, in suite order
    assert load_suite("shapes-val", num_prompts=10, seed=2).prompts != a
    with pytest.raises(PrefalignError, match="has 200 prompts"):
        select_prompts(full.prompts, 201, 0, "shapes-val")


def test_bad_files_and_names_are_one_line_errors(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(PrefalignError, match="no prompt column"):
        load_suite(f"file:{bad}")
    with pytest.raises(PrefalignError, match="unknown suite 'nope'"):
        load_suite("nope")
    with pytest.raises(PrefalignError, match="does not exist"):
        load_suite(f"file:{tmp_path / 'missing.txt'}")
