"""The embedded demo dataset (aigid.sources.demo): the same rows generated in memory or written split by split."""

import yaml

from aigid.sources.demo import TRACES, generate_demo
from helpers import REPO


def test_demo_written_to_a_cache_dir_has_the_rows_made_in_memory(tmp_path):
    sizes = {"train": 3, "test": 2}
    in_memory = generate_demo(sizes, image_size=16, seed=7)
    on_disk = generate_demo(sizes, image_size=16, seed=7, cache_dir=str(tmp_path))
    assert list(on_disk) == list(in_memory)
    for split in sizes:
        assert on_disk[split].features == in_memory[split].features
        assert on_disk[split].to_dict() == in_memory[split].to_dict()
        assert len(on_disk[split]) == len(TRACES) * sizes[split]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-test.arrow", "demo-train.arrow"]
    assert on_disk["test"]["caption_id"][0] == 3  # ids run on across splits


def test_every_caption_gets_one_image_per_trace_and_the_committed_classes_are_the_traces():
    rows = generate_demo({"train": 2}, image_size=16, seed=3)["train"]
    for caption_id in set(rows["caption_id"]):
        labels = [r["Label_B"] for r in rows if r["caption_id"] == caption_id]
        assert labels == list(range(len(TRACES)))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(TRACES) == params["prepare"]["class_names"]
