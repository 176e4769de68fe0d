"""The embedded demo dataset (aigid.sources.demo): the same rows generated in memory or written split by split."""

from aigid.sources.demo import generate_demo


def test_demo_written_to_a_cache_dir_has_the_rows_made_in_memory(tmp_path):
    sizes = {"train": 3, "test": 2}
    in_memory = generate_demo(sizes, image_size=16, seed=7)
    on_disk = generate_demo(sizes, image_size=16, seed=7, cache_dir=str(tmp_path))
    assert list(on_disk) == list(in_memory)
    for split in sizes:
        assert on_disk[split].features == in_memory[split].features
        assert on_disk[split].to_dict() == in_memory[split].to_dict()
        assert len(on_disk[split]) == 6 * sizes[split]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-test.arrow", "demo-train.arrow"]
    assert on_disk["test"]["caption_id"][0] == 3  # ids run on across splits
