"""Runs name the container image that produced them: ALIGNLAB_IMAGE_DIGEST / ALIGNLAB_IMAGE (set by the Helm
chart's ConfigMap and by `make image-test`) become the tags alignlab.image / alignlab.image_ref of every run."""

from mlflow.tracking import MlflowClient

from alignlab.tracking.mlflow_tracker import TAG_IMAGE, TAG_IMAGE_REF, RunTracker, image_tags

DIGEST = "sha256:" + "ab" * 32


def test_image_variables_become_run_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLAB_IMAGE_DIGEST", DIGEST)
    monkeypatch.setenv("ALIGNLAB_IMAGE", "registry.example.org/alignlab:0.1.0-cu130")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with RunTracker.start(uri, "images", "parent", tags={}, params={}) as parent:
        with RunTracker.start(uri, "images", "child", tags={"alignlab.arm": "a"}, params={"x": 1},
                              parent_run_id=parent.run_id) as child:
            pass
    client = MlflowClient(tracking_uri=uri)
    for run_id in (parent.run_id, child.run_id):
        tags = client.get_run(run_id).data.tags
        assert tags[TAG_IMAGE] == DIGEST
        assert tags[TAG_IMAGE_REF] == "registry.example.org/alignlab:0.1.0-cu130"


def test_no_image_no_tag():
    assert image_tags({}) == {}
    assert image_tags({"ALIGNLAB_IMAGE_DIGEST": "", "ALIGNLAB_IMAGE": "x:1"}) == {TAG_IMAGE_REF: "x:1"}
